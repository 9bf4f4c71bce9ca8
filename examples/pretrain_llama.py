"""Pretrain a small Llama on Python code with plain `tokenizers`, `transformers` and torch: no phf.

It stands for the model a researcher brings to phf: another architecture (Llama: rotary positions, RMSNorm, SwiGLU,
grouped-query attention, untied output layer), a tokenizer phf did not train (byte-level BPE with Llama 3's special
tokens, `<|end_of_text|>` ending documents), and a pretraining corpus other than the one phf finetunes on. The
measurement in docs/results.md ("A model phf did not create") finetunes it with `phf demo --init-from`.

    python examples/pretrain_llama.py --out runs/llama-base \\
        --corpus "$(python -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')"
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def read_corpus(folder: Path, max_mb: float) -> list[str]:
    """The folder's .py files, in a fixed order, up to `max_mb` megabytes."""
    texts, size = [], 0
    for path in sorted(folder.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            size += len(text)
        if size >= max_mb * 1e6:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="a folder of Python files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-mb", type=float, default=20.0, help="corpus megabytes to read")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=600_000, help="pretraining tokens")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    texts = read_corpus(args.corpus, args.max_mb)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    ids = []
    for batch in range(0, len(texts), 256):
        for doc in tokenizer(texts[batch:batch + 256], add_special_tokens=False)["input_ids"]:
            ids += [tokenizer.eos_token_id] + doc
    stream = torch.tensor(ids, dtype=torch.long)
    print(f"{len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} M characters, {len(stream) / 1e6:.2f} M tokens")

    mlp = -(-8 * args.width // 3 // 32) * 32  # SwiGLU at 8/3 of the width, rounded up to a multiple of 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=mlp,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.context,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = math.ceil(args.max_tokens / (args.batch_size * args.context))
    t0 = time.perf_counter()
    for step in range(steps):
        lr = args.lr * min(1.0, (step + 1) / (0.1 * steps)) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - args.context - 1, (args.batch_size,))
        x = torch.stack([stream[s:s + args.context] for s in starts])
        loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            seen = (step + 1) * args.batch_size * args.context
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} {seen / (time.perf_counter() - t0):,.0f} tok/s")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters to {args.out}")


if __name__ == "__main__":
    main()
