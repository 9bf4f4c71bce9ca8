"""The checkpoints of a training run, and resuming from them.

    out_dir/checkpoint/          the latest weights as an HF folder (phf.model.lm.save_checkpoint: config, weights,
                                 tokenizer, phf.json meta), the objective's extras (AWR's value head), and
                                 trainer_state.pt (optimizer state, torch RNG state) + trainer_state.json (step,
                                 tokens, seconds, early stopping's state): a run resumes exactly from it
    out_dir/best/                the weights of the best validation loss (early stopping), no trainer state
    out_dir/snapshots/step-N/    the weights after step N (branch points of finetuning runs), no trainer state

Under FSDP2 every rank takes part in gathering the full state (gather_full_state) and rank 0 writes it: the files
are those of an unsharded run (DDP and FSDP checkpoints are interchangeable).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from phf.core.config import RunConfig
from phf.core.errors import PhfError
from phf.core.io import read_json, recover_dir, write_json
from phf.core.run_folder import checkpoint_dir
from phf.evaluation.sampling import sampling_settings
from phf.model.conditioning import markers_of
from phf.model.finetune import resolve_model_folder
from phf.model.lm import check_model_folder, load_meta, load_model, save_checkpoint
from phf.tasks import task_for
from phf.training.distributed import Dist, gather_full_state, load_sharded_optimizer
from phf.training.objectives import Objective

TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"


@dataclass
class Progress:
    """How far a run is: optimizer steps, tokens trained on, seconds of training (trainer_state.json)."""
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0


def restore_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the weights of an HF folder written by this run into `model` (same architecture)."""
    state = load_model(folder, device="cpu").state_dict()

    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2 shards: each rank keeps its part

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise PhfError(f"the weights in {folder} do not fit this model (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); delete {folder} and train again")


# -- resuming -------------------------------------------------------------------------------------------------------
def resume_state(out_dir: Path) -> tuple[Progress, dict | None]:
    """Check that a run can resume (before anything is built) and read where it stopped: its progress and early
    stopping's state."""
    folder = checkpoint_dir(out_dir)
    recover_dir(folder)  # a run killed between the two renames of a checkpoint swap left it aside
    if not folder.exists():
        raise PhfError(f"{out_dir} has no checkpoint yet (the run stopped before its first one); start it again "
                       f"with `phf train --config {out_dir / 'config.yaml'} --out {out_dir}`")
    check_model_folder(folder)
    if not (folder / TRAINER_STATE_JSON).exists():
        raise PhfError(f"{folder} holds no resumable trainer state; it was written by a finished run or by "
                       f"another tool — start a new run with --init-from instead")
    state = read_json(folder / TRAINER_STATE_JSON)
    return Progress(state["step"], state["tokens"], state["seconds"]), state.get("best")


def check_resumed_markers(out_dir: Path, model: torch.nn.Module, markers: list[int] | None) -> None:
    """A resumed model reads control types exactly when the run's objective gives them."""
    if markers_of(model) != markers:
        raise PhfError(f"{checkpoint_dir(out_dir)} was trained with objective.control_embedding="
                       f"{markers_of(model) is not None}; resume it with the same setting (see "
                       f"{out_dir / 'config.yaml'})")


def tokens_before(out_dir: Path, init_from: str | Path | None, resume: bool) -> int:
    """Tokens the starting checkpoint had already seen: a finetune's curves continue its base's (`total_tokens`);
    a resumed run keeps the count it started with."""
    if resume:
        return int(load_meta(checkpoint_dir(out_dir)).get("tokens_before", 0))
    if init_from:
        meta = load_meta(resolve_model_folder(init_from))
        return int(meta.get("tokens_seen_total") or meta.get("tokens_seen") or 0)
    return 0


def load_trainer_state(out_dir: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool,
                       device: torch.device) -> None:
    """The optimizer's state (over FSDP2 shards when `sharded`) and torch's RNG state, as the checkpoint left them."""
    blob = torch.load(checkpoint_dir(out_dir) / TRAINER_STATE, map_location=device, weights_only=True)
    if sharded:
        load_sharded_optimizer(root, optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])


@dataclass
class CheckpointManager:
    """Writes a run's checkpoints (see the module docstring) and restores the best weights."""
    out_dir: Path
    """The run folder: the checkpoint goes to its `checkpoint/` (`dir`), the best weights to its `best/`."""
    cfg: RunConfig
    """The run's config, described in each checkpoint's phf.json."""
    tokenizer_file: Path
    """The run's tokenizer, saved beside the weights."""
    objective: Objective
    """The objective, described in phf.json; it writes its own files (an objective's heads) too."""
    d: Dist
    """The ranks: rank 0 writes; under FSDP2 all take part in gathering the state."""
    model: torch.nn.Module
    """The model whose weights are saved (sharded in place under FSDP2)."""
    root: torch.nn.Module
    """What is optimised: the model and an objective's heads."""
    optimizer: torch.optim.Optimizer
    """The optimizer, whose state resuming needs."""
    sharded: bool
    """FSDP2: the full state is gathered from the shards before it is written."""
    tokens_before: int
    """Tokens the model saw before this run (a finetuning run's base), added to its own in phf.json."""

    @property
    def dir(self) -> Path:
        """The run's checkpoint folder."""
        return checkpoint_dir(self.out_dir)

    @property
    def best_dir(self) -> Path:
        """The folder of the best weights (early stopping)."""
        return self.out_dir / "best"

    # -- saving ---------------------------------------------------------------------------------------------------
    def save_periodic(self, p: Progress, best: dict) -> None:
        self.save(p, best, final=False)

    def save_final(self, p: Progress, best: dict, **more) -> None:
        self.save(p, best, final=True, **more)

    def save_best(self, p: Progress) -> None:
        self.save(p, None, final=False, folder=self.best_dir)

    def save_snapshot(self, p: Progress) -> None:
        self.save(p, None, final=False, folder=self.out_dir / "snapshots" / f"step-{p.step}")

    def save(self, p: Progress, best: dict | None, final: bool, folder: Path | None = None, **more) -> None:
        """Collective under FSDP2 (every rank calls it). With `best` (early stopping's state) the folder also gets
        the trainer state that resuming needs; `more` goes into phf.json."""
        weights, optim_state = self.model, None
        if self.sharded:  # every rank takes part in gathering the full state; rank 0 writes it
            weights, optim_state = gather_full_state(self.model, self.root, self.optimizer)
        if not self.d.main:
            return
        cfg = self.cfg
        meta = {"objective": self.objective.describe(), "step": p.step, "tokens_seen": p.tokens,
                "model": cfg.model.__dict__, "task": cfg.task, "scorer": cfg.scoring.scorer,
                "segmenter": task_for(cfg).segmenter, "final": final, "tokens_before": self.tokens_before,
                "tokens_seen_total": self.tokens_before + p.tokens, "sample": sampling_settings(cfg.sample), **more}

        def extra(tmp: Path) -> None:
            if best is not None:
                torch.save({"optimizer": self.optimizer.state_dict() if optim_state is None else optim_state,
                            "torch_rng": torch.get_rng_state()}, tmp / TRAINER_STATE)
                write_json(tmp / TRAINER_STATE_JSON, {"step": p.step, "tokens": p.tokens, "seconds": p.seconds,
                                                      "best": best})
            self.objective.save_extra(tmp)

        save_checkpoint(weights, self.tokenizer_file, folder or self.dir, meta, extra=extra)

    def restore_best(self) -> None:
        """Every rank loads the best weights, which rank 0 wrote, into the model."""
        self.d.barrier()
        restore_weights(self.model, self.best_dir)
