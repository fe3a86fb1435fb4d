"""The run folder: every file written atomically (temp file + rename), read back without pickle.

<output_dir>/<name>/
  config.yaml              fully resolved config
  metrics.jsonl            one JSON object per round (round 0 = zero-shot evaluation)
  path.parquet             virtual-path log: round, client, step, seed, scalar, lr, weight, grad_ip
                           (+ perturbation with zo.num_perturbations > 1: P rows per step)
  mask.safetensors         per masked parameter its sorted flat indices (+ pretrain_grad)
  sparse_init.safetensors  masked values before training (float32, key "theta", mask order)
  sparse_final.safetensors masked values after training
  clients.json             per client: data size, label histogram, truly extreme or not
  summary.json             final / zero-shot accuracy, totals, flagged vs extreme clients
  tb/                      TensorBoard event file: the per-round scalars, appended as the run goes
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import MeerkatError

if TYPE_CHECKING:  # pandas is imported where a frame is written or read: a client actor's process never needs it
    import pandas as pd

PATH_COLUMNS = ["round", "client", "step", "seed", "scalar", "lr", "weight", "grad_ip"]


def path_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of path rows as path.parquet keeps them (+ perturbation when P > 1)."""
    return PATH_COLUMNS + (["perturbation"] if "perturbation" in frame else [])


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success rename it over `path` (never a truncated file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files of `atomic_path` writes that a killed process left in `folder` (never
    renamed over their target, so never part of the run). Returns what was removed."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(_json_safe(obj), indent=2) + "\n")


def save_theta(path: str | Path, theta: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"theta": theta.detach().to(torch.float32).cpu().contiguous()}, str(tmp))


def theta_digest(theta: torch.Tensor) -> str:
    """SHA-256 of the fp32 values: processes compare their global values without sending n of them."""
    import hashlib

    return hashlib.sha256(theta.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


def load_theta(path: str | Path) -> torch.Tensor:
    try:
        return load_file(str(path))["theta"]
    except Exception as exc:
        raise MeerkatError(f"{path}: not a readable sparse-values file ({type(exc).__name__})") from None


def remove_owned_folder(folder: Path, marker: str, what: str) -> None:
    """Delete `folder` for --overwrite, but only if it is empty or holds `marker` (ours)."""
    if not (folder / marker).is_file() and any(folder.iterdir()):
        raise MeerkatError(f"{folder}: exists and is not a {what} folder; refusing to overwrite it")
    shutil.rmtree(folder)


class RunWriter:
    """Owns one run folder; the round loop hands it records, it keeps the files current."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.metrics: list[dict] = []
        self.path_frames: list[pd.DataFrame] = []
        self.scalars = ScalarLog(self.dir / "tb")

    def write_config(self, cfg_dict: dict) -> None:
        write_text(self.dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))

    def add_round(self, metrics: dict, path_rows: pd.DataFrame | None) -> None:
        """Append one round's metrics and path rows; both files are rewritten atomically."""
        self.metrics.append(_json_safe(metrics))
        write_text(self.dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        if path_rows is not None and len(path_rows):
            self.path_frames.append(path_rows[path_columns(path_rows)])
        self.write_path()
        self.scalars.add_round(self.metrics)

    def write_path(self) -> None:
        import pandas as pd

        frame = (pd.concat(self.path_frames, ignore_index=True) if self.path_frames
                 else pd.DataFrame({c: pd.Series(dtype="float64") for c in PATH_COLUMNS}))
        with atomic_path(self.dir / "path.parquet") as tmp:
            frame.to_parquet(tmp, index=False)


# metrics.jsonl field -> TensorBoard tag (per round; totals are added as bytes/*_total)
TB_TAGS = {"accuracy": "accuracy/test", "train_loss": "loss/train", "test_loss": "loss/test",
           "uplink_bytes": "bytes/uplink_round", "downlink_bytes": "bytes/downlink_round",
           "local_steps": "steps/local_round", "wall_s": "time/round_s", "compute_s": "time/compute_s"}


class ScalarLog:
    """Per-round scalars as a TensorBoard event file, `tensorboard --logdir` over run folders.

    Appends one batch of records per round to one file and closes it again: no writer thread,
    nothing to close at the end, and a resumed run continues the same file."""

    FILE = "events.out.tfevents.meerkat-ray"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.FILE

    def add_round(self, metrics: list[dict]) -> None:
        """Log the last round of `metrics` (all rounds so far, for the running totals)."""
        from tensorboardX.proto.event_pb2 import Event  # the training process only; torch is loaded already
        from tensorboardX.proto.summary_pb2 import Summary

        last = metrics[-1]
        values = {tag: last.get(key) for key, tag in TB_TAGS.items()}
        values["bytes/uplink_total"] = sum(m.get("uplink_bytes") or 0 for m in metrics)
        values["bytes/downlink_total"] = sum(m.get("downlink_bytes") or 0 for m in metrics)
        values["clients/flagged"] = len(last.get("flagged_clients") or [])
        values["clients/rejected"] = len(last.get("rejected_clients") or [])
        values.update(vpcs_scalars(last))
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()
                                 if isinstance(v, (int, float)) and math.isfinite(v)])
        events = [Event(wall_time=time.time(), step=int(last["round"]), summary=summary)]
        self.path.parent.mkdir(exist_ok=True)
        if not self.path.is_file():
            events.insert(0, Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
        with open(self.path, "ab") as f:
            for event in events:
                f.write(_tf_record(event.SerializeToString()))


def vpcs_scalars(metrics: dict) -> dict:
    """TensorBoard tags of the VPCS decision, logged at the round it was made: each client's
    statistics, whether it was flagged, and precision / recall where the extreme clients are known."""
    out = {}
    if not metrics.get("vp_decided"):
        return out
    flagged = set(metrics.get("flagged_clients") or [])
    for client, stats in (metrics.get("vpcs") or {}).items():
        for name in ("rho_later", "quiet_fraction", "level", "z", "trend_z"):  # those of the run's vp.rule
            if name in stats:
                out[f"vpcs/{name}/client_{client}"] = stats[name]
        out[f"vpcs/flagged/client_{client}"] = float(int(client) in flagged)
    flagging = metrics.get("flagging") or {}
    out["vpcs/precision"], out["vpcs/recall"] = flagging.get("precision"), flagging.get("recall")
    out["vpcs/decided_round"] = metrics["round"]
    return out


def _tf_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_path(run_dir: str | Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(Path(run_dir) / "path.parquet")
