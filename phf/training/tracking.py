"""Where training metrics go: always `metrics.jsonl` in the run folder; optionally TensorBoard and Weights & Biases.

`train.trackers` names the extra ones (`tensorboard`, `wandb`). Each is imported only when named, so neither is a
dependency (`pip install 'phf[tensorboard]'` / `'phf[wandb]'`); W&B runs in offline mode unless WANDB_MODE says
otherwise, so nothing needs an account or a network: `wandb sync` uploads a run later if you want it online.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from phf.core.errors import PhfError
from phf.core.io import append_jsonl

TRACKERS = ("tensorboard", "wandb")


class Tracker:
    def log(self, row: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in ("step",) and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    """Scalars under `<run>/tensorboard/`: `tensorboard --logdir runs/`."""

    def __init__(self, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PhfError("train.trackers names tensorboard, which is not installed: "
                           "pip install 'phf[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in `<run>/wandb/`, offline unless WANDB_MODE is set."""

    def __init__(self, out_dir: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise PhfError("train.trackers names wandb, which is not installed: pip install 'phf[wandb]'") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project="phf", name=name, dir=str(out_dir), config=config, reinit="finish_previous")

    def log(self, row: dict) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """Appends rows to `metrics.jsonl` and forwards them to the enabled trackers."""

    def __init__(self, path: Path, trackers: Sequence[str] = (), config: dict | None = None, name: str = ""):
        self.path = path
        self.trackers: list[Tracker] = []
        for t in trackers:
            if t == "tensorboard":
                self.trackers.append(TensorBoardTracker(path.parent))
            elif t == "wandb":
                self.trackers.append(WandbTracker(path.parent, config or {}, name or path.parent.name))
            else:
                raise PhfError(f"unknown tracker {t!r} in train.trackers; known: {', '.join(TRACKERS)}")

    def log(self, row: dict) -> None:
        append_jsonl(self.path, row)
        for t in self.trackers:
            t.log(row)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
