"""`hf-classifier:PATH[:LABEL]`: a tiny BERT classifier, built and trained offline here to tell sentences with the
word `loud` from sentences without it, scores a corpus, a judge's samples, and hostile folders and labels."""
import json
import math
import random

import pytest

WORDS = [f"w{i}" for i in range(30)]


def _sentence(rng: random.Random, loud: bool, n: int = 8) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if loud:
        words[rng.randrange(n)] = "loud"
    return " ".join(words) + "."


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "loud", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   model_max_length=24)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def loud_classifier(tmp_path_factory):
    """Labels 0=quiet, 1=loud; trained for 80 steps (a second or two) until it separates the two."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("classifier") / "loud"
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=24, num_labels=2,
                        id2label={0: "quiet", 1: "loud"}, label2id={"quiet": 0, "loud": 1})
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(80):
        labels = [rng.random() < 0.5 for _ in range(32)]
        enc = tok([_sentence(rng, y) for y in labels], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor(labels, dtype=torch.long)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)
    return folder


def test_the_classifier_scores_the_probability_of_its_positive_label(loud_classifier):
    from phf.data.scorers import get_scorer

    scorer = get_scorer(f"hf-classifier:{loud_classifier}")
    assert scorer.label == "loud" and scorer.segmenter == "sentences" and scorer.aggregate == "max"
    rng = random.Random(1)
    loud = scorer.score_segments([_sentence(rng, True) for _ in range(40)])
    quiet = scorer.score_segments([_sentence(rng, False) for _ in range(40)])
    assert min(loud) > 0.9 and max(quiet) < 0.1  # it learnt the distinction: scores mean what they say
    by_name = get_scorer(f"hf-classifier:{loud_classifier}:quiet").score_segments(["w1 loud w2."])
    by_index = get_scorer(f"hf-classifier:{loud_classifier}:0").score_segments(["w1 loud w2."])
    assert by_name == by_index and math.isclose(by_name[0], 1 - scorer.score_segments(["w1 loud w2."])[0],
                                                abs_tol=1e-6)
    doc = scorer.score_texts(["w1 w2 w3. w4 loud w5. w6 w7."])[0]
    assert len(doc.scores) == 3 and doc.scores[1] > 0.9 > 0.1 > max(doc.scores[0], doc.scores[2])
    assert scorer.sample_score(doc) == doc.scores[1]  # a sample is as bad as its worst sentence


def test_batches_and_truncation_give_the_scores_of_one_segment_at_a_time(loud_classifier):
    from phf.data.scorers.classifier import HFClassifierScorer

    rng = random.Random(2)
    texts = [_sentence(rng, rng.random() < 0.5, n=rng.randrange(1, 40)) for _ in range(50)]  # up to 40 words > 24
    texts.append("loud " + " ".join(["w1"] * 60) + ".")  # longer than 24 tokens: the model reads the first 24
    batched = HFClassifierScorer(f"hf-classifier:{loud_classifier}", batch_size=7)
    one = [batched.score_segments([t])[0] for t in texts]
    assert batched.max_length == 24
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(batched.score_segments(texts), one))
    first_24_tokens = "loud " + " ".join(["w1"] * 22)  # [CLS] and 23 words
    assert one[-1] == pytest.approx(batched.score_segments([first_24_tokens])[0], abs=1e-6) and one[-1] > 0.9
    cut = HFClassifierScorer(f"hf-classifier:{loud_classifier}", max_chars=10)
    late = "w1 w2 w3 w4 w5 loud."  # `loud` starts after character 10
    assert cut.score_segments([late])[0] == pytest.approx(cut.score_segments(["w1 w2 w3 w4"])[0], abs=1e-6)
    assert cut.score_segments([late])[0] < 0.1 < 0.9 < batched.score_segments([late])[0]
    assert cut.settings()["max_chars"] == 10 and cut.settings() != batched.settings()  # a new scored corpus


def test_a_classifier_scores_a_corpus_and_judges_samples(loud_classifier, tmp_path):
    from phf.core.config import CorpusConfig, ScoringConfig
    from phf.data.scoring import score_corpus
    from phf.evaluation.evaluate import score_samples

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(3)
    for i in range(12):
        (corpus / f"{i}.txt").write_text(" ".join(_sentence(rng, i % 3 == 0) for _ in range(4)))
    scored = score_corpus(CorpusConfig(source=str(corpus), extensions=[".txt"], validation_fraction=0,
                                       test_fraction=0),
                          ScoringConfig(scorer=f"hf-classifier:{loud_classifier}", workers=1, device="cpu"),
                          tmp_path / "data", progress=False)
    by_doc = {d.id: d.score for d in scored.documents()}
    assert len(by_doc) == 12
    assert all((v > 0.9) == (int(k.split(".")[0]) % 3 == 0) for k, v in by_doc.items())
    pooled = score_corpus(CorpusConfig(source=str(corpus), extensions=[".txt"], validation_fraction=0,
                                       test_fraction=0),
                          ScoringConfig(scorer=f"hf-classifier:{loud_classifier}", workers=2, shard_documents=4),
                          tmp_path / "pooled", progress=False)  # three shards over two forked processes
    assert len(pooled.shard_files()) == 3
    assert {d.id: d.score for d in pooled.documents()} == pytest.approx(by_doc, abs=1e-6)
    from phf.evaluation.sampling import Sample

    from phf.evaluation.evaluate import judge_for
    from phf.tasks import get_task, task_for

    cfg = get_task("toxicity").run_config("mle", [f"eval.judge=hf-classifier:{loud_classifier}:loud"])
    judge, block = judge_for(cfg, task_for(cfg))  # as evaluation names its judge
    assert block["judge_scorer"] == f"hf-classifier:{loud_classifier}:loud"
    assert block["judge_version"].startswith("weights ") and judge.label == "loud"
    samples = [Sample("unconditional", "", text, text, True, 6) for text in ("w1 w2. loud w3.", "w1 w2. w3 w4.")]
    judged = score_samples(samples, judge)
    assert judged[0] > 0.9 > 0.1 > judged[1]


def test_hostile_folders_and_labels_are_one_line_errors(loud_classifier, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from phf.core.errors import PhfError
    from phf.data.scorers import get_scorer

    lm = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=24)).save_pretrained(lm)
    _tokenizer(lm)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.bin").write_bytes(b"0")
    three = tmp_path / "three"
    three.mkdir()
    config = json.loads((loud_classifier / "config.json").read_text())
    config.update(id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    (three / "config.json").write_text(json.dumps(config))
    cases = [(f"hf-classifier:{lm}", "holds GPT2LMHeadModel, not a sequence classifier"),
             (f"hf-classifier:{tmp_path / 'missing'}", "is not a folder"),
             (f"hf-classifier:{bare}", "has no config.json"),
             (f"hf-classifier:{loud_classifier}:angry", "has no label 'angry'; its labels are 0=quiet, 1=loud"),
             (f"hf-classifier:{loud_classifier}:2", "has no label '2'"),
             (f"hf-classifier:{three}", "has 3 labels (0=a, 1=b, 2=c); name the one to score"),
             ("hf-classifier:", "give the classifier's folder")]
    for spec, message in cases:
        with pytest.raises(PhfError, match="^[^\n]*$") as err:
            get_scorer(spec)
        assert message in str(err.value), (spec, str(err.value))
