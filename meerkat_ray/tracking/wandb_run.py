"""Weights & Biases: the mode (WANDB_MODE, offline by default) checked before a run starts, and
one W&B run whose files live in the run folder (RUN_DIR/wandb/)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import MeerkatError

WANDB_MODES = ("offline", "online", "disabled")


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


def check_wandb() -> None:
    mode = wandb_mode()
    if mode not in WANDB_MODES:
        raise MeerkatError(f"tracking.wandb_project: WANDB_MODE must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    import wandb

    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
        raise MeerkatError("tracking.wandb_project: WANDB_MODE=online needs a W&B API key (`wandb login` or "
                           "WANDB_API_KEY); WANDB_MODE=offline writes the run to RUN_DIR/wandb/ for a later `wandb sync`")


class WandbRun:
    """One W&B run whose files live in the run folder (RUN_DIR/wandb/)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, project: str, folder: Path, name: str, group: str, params: dict, run_id: str) -> "WandbRun":
        import wandb

        settings = wandb.Settings(console="off", silent=True, save_code=False, disable_git=True,
                                  x_disable_stats=True)
        run = wandb.init(project=project, dir=str(folder), name=name, group=group or None, config=params,
                         id=run_id, resume="allow", mode=wandb_mode(), settings=settings, reinit="create_new")
        return cls(run)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifacts(self, summary: dict, figures: list[Path], step: int) -> None:
        import wandb

        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        if figures:
            self.run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}, step=step)

    def end(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def new_run_id() -> str:
    """A fresh W&B run id (kept in tracking.json, so a resumed run continues the same W&B run)."""
    import uuid

    return uuid.uuid4().hex[:12]
