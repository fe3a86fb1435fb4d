"""Storage URIs (`s3://`, `gs://`, `file://`, ... as `pyarrow.fs` resolves them) and this node's
scratch folders for what is stored under one: string work and local paths only, so the config tree
can name a run's local folder without reaching storage itself (`storage` does the I/O)."""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def uri_join(uri: str, *names: str) -> str:
    """`s3://b/p?x=1` + `a`, `b` -> `s3://b/p/a/b?x=1` (query options stay at the end)."""
    base, sep, query = str(uri).partition("?")
    return "/".join([base.rstrip("/"), *names]) + (f"?{query}" if sep else "")


def uri_name(uri: str) -> str:
    return uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def uri_parent(uri: str) -> str:
    base, sep, query = uri.partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + (f"?{query}" if sep else "")


_attempt: dict[int, str] = {}  # pid -> this process's attempt token (a forked child gets its own)


def attempt_token() -> str:
    """`<pid>-<random>`: names the scratch folders of the runs this process makes."""
    pid = os.getpid()
    return _attempt.setdefault(pid, f"{pid}-{secrets.token_hex(4)}")


def remove_dead_attempts(uri: str) -> None:
    """Remove this node's scratch folders of runs under `uri` whose attempt's process is gone (a
    killed attempt cannot clean up after itself; its replacement does, on the same node)."""
    folder = scratch_dir(uri, "x").parent
    for old in folder.glob("attempt-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def scratch_dir(uri: str, name: str, attempt: bool = False) -> Path:
    """This node's local folder for `name` stored under `uri`; `attempt`: one of this process's own
    (a run: an attempt that is being stopped and the one replacing it never share a folder)."""
    root = Path(os.environ.get("MEERKAT_RAY_SCRATCH") or Path(tempfile.gettempdir()) / "meerkat-ray-scratch")
    folder = root / hashlib.sha1(uri.encode()).hexdigest()[:12]
    return folder / f"attempt-{attempt_token()}" / name if attempt else folder / name


def run_location(cfg) -> str:
    """Where a run folder lives for good: its URI, or its path."""
    return uri_join(cfg.output_dir, cfg.name) if is_uri(cfg.output_dir) else str(cfg.run_dir)
