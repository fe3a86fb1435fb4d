"""The state after a finished round, enough to continue a federation bit for bit.

A checkpoint folder holds `federation.json` (round, the loop's running evaluation record, the
server's counters, cursors and Meerkat-vp state) and `theta.safetensors` (the global masked
values). Clients need nothing else: they rebuild model, mask and data from the config and start
from theta. The run folder is cut back to the checkpoint's round, so rounds written after it (by
an interrupted attempt) are written again, identically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .runlog import PATH_COLUMNS, RunWriter, load_theta, read_metrics, read_path, save_theta, write_text

STATE_FILE = "federation.json"
THETA_FILE = "theta.safetensors"


@dataclass
class RunCheckpoint:
    round: int            # last finished round
    last: dict            # the round loop's running record (accuracy, best_accuracy, zero-shot ...)
    server: dict          # Server.state_dict()[0]
    theta: torch.Tensor   # global values after `round` (fp32, mask order)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        state = {"round": self.round, "last": self.last, "server": self.server}
        write_text(folder / STATE_FILE, json.dumps(state))  # NaN / inf survive Python's JSON round trip
        save_theta(folder / THETA_FILE, self.theta)

    @classmethod
    def load(cls, folder: str | Path) -> RunCheckpoint:
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        return cls(round=state["round"], last=state["last"], server=state["server"],
                   theta=load_theta(folder / THETA_FILE))

    def reopen_writer(self, run_dir: str | Path) -> RunWriter:
        """The run folder's writer holding rounds 0..round, with its files rewritten to match."""
        writer = RunWriter(run_dir)
        kept = [m for m in read_metrics(run_dir) if m["round"] <= self.round]
        path = read_path(run_dir) if (Path(run_dir) / "path.parquet").is_file() else None
        if path is not None and len(path):
            writer.path_frames = [path[path["round"] <= self.round][PATH_COLUMNS].reset_index(drop=True)]
        writer.metrics = kept[:-1]
        writer.add_round(kept[-1], None)  # rewrites metrics.jsonl and path.parquet
        return writer
