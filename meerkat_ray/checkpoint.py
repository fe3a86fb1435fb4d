"""The state after a finished round, enough to continue a federation bit for bit.

One file, `checkpoint.safetensors`: the global masked values (key `theta`, fp32, mask order) and,
as JSON in the file's metadata, the round, the loop's running evaluation record, the server's
counters, data cursors and Meerkat-vp state, and the resolved config. One file written atomically
(temp file + rename) is one commit point: a kill leaves either the previous checkpoint or the new
one, never a mix. Nothing else is needed: every random draw derives from seeds, clients rebuild
model, mask and data from the config and start from theta.

A run folder holds the checkpoint of its last finished round (round 0 = after the zero-shot
evaluation); a Tune trial reports one per round. On resume the run folder is cut back to the
checkpoint's round, so rounds written after it (by an interrupted attempt) are written again,
identically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import Config, from_dict, read_yaml, to_dict
from .errors import ConfigError, MeerkatError
from .runlog import RunWriter, path_columns, atomic_path, read_metrics, read_path, remove_stale_temps

CHECKPOINT_FILE = "checkpoint.safetensors"
META_KEY = "meerkat_checkpoint"


@dataclass
class RunCheckpoint:
    round: int            # last finished round
    last: dict            # the round loop's running record (accuracy, best_accuracy, zero-shot ...)
    server: dict          # Server.state_dict()[0]
    theta: torch.Tensor   # global values after `round` (fp32, mask order)
    config: dict | None = None  # to_dict(cfg) of the run

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        state = {"round": self.round, "last": self.last, "server": self.server, "config": self.config}
        theta = self.theta.detach().to(torch.float32).cpu().contiguous()
        with atomic_path(Path(folder) / CHECKPOINT_FILE) as tmp:  # NaN / inf survive Python's JSON round trip
            save_file({"theta": theta}, str(tmp), metadata={META_KEY: json.dumps(state)})

    @classmethod
    def load(cls, folder: str | Path) -> RunCheckpoint:
        path = Path(folder) / CHECKPOINT_FILE
        if not path.is_file():
            raise MeerkatError(f"{path}: missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                state = json.loads((f.metadata() or {})[META_KEY])
                theta = f.get_tensor("theta")
            round_, last, server = int(state["round"]), dict(state["last"]), dict(state["server"])
            config = state.get("config")
        except Exception as exc:
            raise MeerkatError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
        if theta.dtype != torch.float32 or theta.ndim != 1:
            raise MeerkatError(f"{path}: theta is not a 1-D float32 tensor")
        return cls(round=round_, last=last, server=server, theta=theta, config=config)

    def reopen_writer(self, run_dir: str | Path) -> RunWriter:
        """The run folder's writer holding rounds 0..round, with its files rewritten to match
        (and the temp files of writes a kill interrupted removed)."""
        remove_stale_temps(run_dir)
        writer = RunWriter(run_dir)
        kept = [m for m in read_metrics(run_dir) if m["round"] <= self.round]
        if not kept or kept[-1]["round"] != self.round:
            raise MeerkatError(f"{Path(run_dir) / 'metrics.jsonl'}: ends before round {self.round}, the checkpoint's")
        path = read_path(run_dir) if (Path(run_dir) / "path.parquet").is_file() else None
        if path is not None and len(path):
            writer.path_frames = [path[path["round"] <= self.round][path_columns(path)].reset_index(drop=True)]
        writer.metrics = kept[:-1]
        writer.add_round(kept[-1], None)  # rewrites metrics.jsonl and path.parquet
        return writer


# ----------------------------------------------------------------------------- `run --resume`

RUN_FILES = ("config.yaml", "mask.safetensors", "sparse_init.safetensors", "metrics.jsonl")


def open_resume(run_dir: str | Path, ckpt: RunCheckpoint | None = None,
                expect: Config | None = None) -> tuple[Config, RunCheckpoint]:
    """Config and checkpoint of an interrupted run folder, every file checked before anything starts.

    Every resume goes through here: `run --resume` (the folder's own checkpoint), and a Tune trial
    that is retried or whose sweep is resumed (`ckpt`: the checkpoint Tune kept, checked against the
    run folder it downloaded; `expect`: the trial's own config, which the checkpoint must have been
    made with). Refused (MeerkatError, naming the file): not a run folder, a missing or unreadable
    file, a config.yaml that differs from the config the checkpoint was made with, a checkpoint that
    does not fit the mask or the logs (e.g. one newer than the logs). The folder is not modified here.
    """
    from .mask import load_mask

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MeerkatError(f"{run_dir}: no such run folder")
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise MeerkatError(f"{run_dir / name}: missing (is {run_dir} a run folder?)")
    if ckpt is None and not (run_dir / CHECKPOINT_FILE).is_file():
        raise MeerkatError(f"{run_dir / CHECKPOINT_FILE}: missing: the run stopped before its zero-shot evaluation "
                           "finished, so there is nothing to resume (start it again with --overwrite)")
    try:
        cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    except ConfigError as exc:
        raise MeerkatError(f"{run_dir / 'config.yaml'}: {exc}") from None
    # a moved or renamed run folder resumes where it is now
    cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name
    ckpt = ckpt if ckpt is not None else RunCheckpoint.load(run_dir)
    configs = [(cfg, run_dir / "config.yaml")] + ([(expect, "the config being resumed")] if expect else [])
    made_with = ckpt.config
    if made_with is not None:  # as the keys of today read it: a key added since takes its default
        try:
            made_with = to_dict(from_dict(made_with))
        except ConfigError:
            pass
    for config, label in configs if made_with is not None else ():
        key = first_difference(made_with, to_dict(config), ignore=("name", "output_dir"))
        if key:
            raise MeerkatError(f"{label}: {key} differs from the config the run was checkpointed with; a resumed "
                               "run must keep its config")
    if not 0 <= ckpt.round <= cfg.fed.rounds:
        raise MeerkatError(f"{run_dir / CHECKPOINT_FILE}: round {ckpt.round} is outside 0..{cfg.fed.rounds}")
    mask = load_mask(run_dir / "mask.safetensors")
    if ckpt.theta.numel() != mask.n:
        raise MeerkatError(f"{run_dir / CHECKPOINT_FILE}: {ckpt.theta.numel()} values for a mask of {mask.n} "
                           f"(mask.safetensors belongs to another run)")
    try:
        rounds = [int(m["round"]) for m in read_metrics(run_dir)]
    except (ValueError, KeyError, TypeError):
        raise MeerkatError(f"{run_dir / 'metrics.jsonl'}: not one JSON object with a round per line") from None
    if list(range(ckpt.round + 1)) != [r for r in rounds if r <= ckpt.round]:
        raise MeerkatError(f"{run_dir / 'metrics.jsonl'}: lacks rounds of the checkpoint (0..{ckpt.round})")
    steps = 0
    if ckpt.round > 0:
        try:
            path = read_path(run_dir)
        except Exception as exc:
            raise MeerkatError(f"{run_dir / 'path.parquet'}: not readable ({type(exc).__name__})") from None
        rows = path[path["perturbation"] == 0] if "perturbation" in path else path  # P rows per step
        steps = int((rows["round"] <= ckpt.round).sum()) if "round" in rows else -1
    if steps != ckpt.server.get("local_steps"):
        raise MeerkatError(f"{run_dir / 'path.parquet'}: {steps} steps up to round {ckpt.round}, the checkpoint "
                           f"counts {ckpt.server.get('local_steps')}")
    return cfg, ckpt


def first_difference(a, b, ignore=(), prefix: str = "") -> str:
    """The first dotted key at which two nested config mappings differ ('' = equal)."""
    for key in sorted(set(a) | set(b), key=str):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = first_difference(va, vb, ignore, f"{dotted}.")
            if inner:
                return inner
        elif va != vb:
            return dotted
    return ""
