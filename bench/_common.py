"""Shared by the bench/ scripts: the machine description, medians, timers and the output format.

Every benchmark prints a human table and, as its last line, one JSON object
{"bench": NAME, "machine": {...}, "command": "...", "date": "...", ...results}.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")         # nothing here may touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine() -> dict:
    """CPU model, core count, RAM, torch version and GPU (if any) of this machine."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    ram_gib = None
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        ram_gib = round(kib / 2**20, 1)
    except (OSError, AttributeError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram_gib, "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(values) -> float:
    return float(statistics.median(values))


class Timer:
    """perf_counter around a block; synchronises CUDA first and last when `cuda` is true."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.s = 0.0

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.s = time.perf_counter() - self._t0


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def emit(name: str, payload: dict) -> None:
    """The final JSON line: what was measured, where, when and by which command."""
    record = {"bench": name, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]),
              "machine": machine(), **payload}
    print(json.dumps(record, default=_json_default), flush=True)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def int_list(text: str, flag: str) -> list[int]:
    """A comma list of integers >= 1 from the command line (`flag` names it in the error)."""
    try:
        values = [int(float(v)) for v in text.split(",") if v]
    except ValueError:
        fail(f"{flag}: not a comma list of numbers: {text!r}")
    if not values or min(values) < 1:
        fail(f"{flag}: values must be >= 1")
    return values


def require_positive(args, *names: str) -> None:
    """Every named integer option is >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}: must be >= 1")


def fail(message: str) -> None:
    """Bad command-line input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
