"""Run and sweep folders on storage that every node reaches, with no shared filesystem.

`output_dir` (a run) and `tune.output_dir` (a sweep) may be a URI that `pyarrow.fs` resolves:
`s3://bucket/prefix`, `gs://bucket/prefix`, `file:///abs/path`, ... (query options such as
`?endpoint_override=host:port&scheme=http` reach pyarrow as they are), the same as Ray Tune's
`storage_path`. Then:

- A run writes its run folder on the local disk of the node it runs on (`scratch_dir`: under
  $MEERKAT_RAY_SCRATCH, else the system temp folder, in a folder of this attempt's own, so an
  attempt being stopped never touches the folder of the one that replaces it) and uploads what
  changed at every round's checkpoint (`checkpoint.safetensors` last, so the copy at the URI never
  holds a checkpoint newer than its logs), and everything at the end; then the local folder is
  removed. A lost node loses at most the round in flight. Every file lands at the URI whole (object
  stores commit a write at once; a local or mounted filesystem gets a temp file and a rename), and
  an upload that cannot happen is an error, never a skip.
- A Tune trial that is retried, or a `run --resume URI`, downloads the run folder first and checks
  it against the checkpoint it resumes from (`checkpoint.open_resume`).
- A sweep gives Ray Tune the same URI as its storage; the driver keeps `sweep.yaml` and the
  results table in a local staging folder and uploads them; results, `analyze`, `export` and
  `run --resume` read from the URI (through a temporary local copy).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from .errors import MeerkatError

COMMIT_FIRST = "config.yaml"  # uploaded first: a stored folder cut short still says it is a run folder
COMMIT_LAST = "checkpoint.safetensors"  # uploaded after the logs it points into
ATTEMPT_FILE = ".attempt"  # at a stored run folder: the attempt that writes there now (RunStore.claim)


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


class Store:
    """A folder on a pyarrow filesystem: `fs` and the path on it, `uri` as the user wrote it."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path.rstrip("/"), uri

    def child(self, *names: str) -> Store:
        return Store(self.fs, "/".join([self.path, *names]), uri_join(self.uri, *names))

    def _info(self, rel: str = ""):
        return self.fs.get_file_info(f"{self.path}/{rel}" if rel else self.path)

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(f"{self.path}/{rel}") as f:
            return f.read()

    def upload_file(self, local: Path, rel: str) -> None:
        """Copy one local file to `rel`, whole or not at all: an object store publishes a write only
        when it completes; on a filesystem (file://) the copy goes to a temp name and is renamed."""
        target = f"{self.path}/{rel}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            pafs.copy_files(str(local), target, destination_filesystem=self.fs)
            return
        tmp = f"{target.rsplit('/', 1)[0]}/.{target.rsplit('/', 1)[1]}.{secrets.token_hex(4)}.upload"
        try:
            pafs.copy_files(str(local), tmp, destination_filesystem=self.fs)
            self.fs.move(tmp, target)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def files(self) -> list[str]:
        """Relative paths of every file below this folder."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted(i.path[len(self.path) + 1:] for i in infos if i.type == pafs.FileType.File)

    def download(self, local: Path, skip: tuple[str, ...] = ()) -> Path:
        """Copy every file below this folder into `local` (created; files there are replaced)."""
        local.mkdir(parents=True, exist_ok=True)
        for rel in self.files():
            if rel.split("/", 1)[0] in skip or rel == ATTEMPT_FILE:
                continue
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{self.path}/{rel}", str(target), source_filesystem=self.fs)
        return local

    def delete(self) -> None:
        self.fs.delete_dir(self.path)


def resolve(uri: str, key: str) -> Store:
    """The Store of a URI; a URI pyarrow cannot open is bad input naming `key`."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as exc:
        raise MeerkatError(f"{key}: cannot open {uri!r} as storage ({' '.join(str(exc).split())})") from None
    return Store(fs, path, uri)


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


# ----------------------------------------------------------------------------- runs

class RunStore:
    """Where a run folder written on this node's scratch goes for good: `store` at its URI.

    `claim()` marks the stored folder as this attempt's (`ATTEMPT_FILE`); `prepare()` runs once
    every check of a new run has passed, right before its folder is written: a stored run that
    --overwrite replaces is deleted then, never earlier, and claimed. `commit()` runs after every
    checkpoint and uploads the files changed since the last call, config.yaml first and the
    checkpoint last. Refused (MeerkatError): a local folder that is not there (the round it would
    have stored must not be reported, and checkpointed by Tune, as stored), and a stored folder
    another attempt has claimed since (an attempt that outlives its replacement, e.g. a trial of a
    stopped Ray job, stops instead of overwriting the replacement's files)."""

    def __init__(self, local: Path, store: Store, replaces: bool = False):
        self.local, self.store, self.replaces, self.sent = local, store, replaces, {}

    def claim(self) -> None:
        with tempfile.TemporaryDirectory(prefix="meerkat-ray-") as tmp:
            marker = Path(tmp) / ATTEMPT_FILE
            marker.write_text(attempt_token())
            self.store.upload_file(marker, ATTEMPT_FILE)

    def prepare(self) -> None:
        if self.replaces:
            self.store.delete()
        self.claim()

    def commit(self) -> None:
        if not self.local.is_dir():
            raise MeerkatError(f"{self.local}: the run folder is gone from this node's scratch, so nothing can be "
                               f"uploaded to {self.store.uri}")
        owner = self.store.read_bytes(ATTEMPT_FILE).decode() if self.store.is_file(ATTEMPT_FILE) else None
        if owner != attempt_token():
            raise MeerkatError(f"{self.store.uri}: another attempt ({owner or 'none'}) has taken over this run folder "
                               f"since this one ({attempt_token()}) started; this attempt stops without writing there")
        files = sorted((p for p in self.local.rglob("*") if p.is_file() and not p.name.endswith(".tmp")),
                       key=lambda p: (p.name != COMMIT_FIRST, p.name == COMMIT_LAST))
        for path in files:
            stat = path.stat()
            rel = path.relative_to(self.local).as_posix()
            version = (stat.st_size, stat.st_mtime_ns, stat.st_ino)  # an atomic rewrite is a new inode
            if self.sent.get(rel) != version:
                self.store.upload_file(path, rel)
                self.sent[rel] = version


def run_stored(cfg, overwrite: bool = False, progress: bool = True, on_round=None, resume=None) -> dict:
    """`runner.run_experiment`, with the run folder uploaded to `output_dir` when that is a URI
    (after every checkpoint, before `on_round` sees the round, and at the end; `RunStore`)."""
    from .runner import EXISTS, run_experiment

    if not is_uri(cfg.output_dir):
        return run_experiment(cfg, overwrite=overwrite, progress=progress, on_round=on_round, resume=resume)
    store = resolve(cfg.output_dir, "output_dir").child(cfg.name)
    local = cfg.run_dir
    remove_dead_attempts(cfg.output_dir)
    replaces = False
    if resume is None:
        if store.exists():
            if not overwrite:
                raise MeerkatError(f"{store.uri}: {EXISTS}")
            if not (store.is_file("config.yaml") or store.is_file(ATTEMPT_FILE)):  # (an attempt stopped early)
                raise MeerkatError(f"{store.uri}: not a run folder (no config.yaml); refusing to replace it")
            replaces = True
        shutil.rmtree(local, ignore_errors=True)  # this process's leftovers of an earlier run of the name
    stored = RunStore(local, store, replaces)
    if resume is not None:
        stored.claim()  # from here on, an earlier attempt still running cannot write there
    try:
        summary = run_experiment(cfg, overwrite=True, progress=progress, on_round=on_round, resume=resume,
                                 store=stored)
        stored.commit()
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if progress:
        print(f"run folder uploaded to {store.uri}")
    return summary


def fetch_run_dir(cfg) -> None:
    """A run stored at a URI: replace this node's local run folder with the stored one (if any)."""
    if is_uri(cfg.output_dir):
        store = resolve(cfg.output_dir, "output_dir").child(cfg.name)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        if store.exists():
            store.download(cfg.run_dir)


def open_resume_uri(uri: str):
    """`run --resume URI`: the stored run folder downloaded to this node's scratch, checked as a
    local one (checkpoint.open_resume); the config keeps the URI as its output_dir."""
    from .checkpoint import open_resume
    from .config import Config

    store = resolve(uri, "run --resume")
    if not store.exists():
        raise MeerkatError(f"{uri}: no such run folder")
    parent, name = uri_parent(uri), uri_name(uri)
    local = Config(output_dir=parent, name=name).run_dir
    shutil.rmtree(local, ignore_errors=True)
    store.download(local)
    cfg, ckpt = open_resume(local)
    cfg.output_dir, cfg.name = parent, name
    return cfg, ckpt


@contextlib.contextmanager
def local_copy(path: str, skip: tuple[str, ...] = ()):
    """A local folder holding `path`: the path itself, or a temporary download of a URI."""
    if not is_uri(path):
        yield Path(path)
        return
    store = resolve(path, path)
    if not store.exists():
        raise MeerkatError(f"{path}: no such folder")
    with tempfile.TemporaryDirectory(prefix="meerkat-ray-") as tmp:
        yield store.download(Path(tmp) / uri_name(path), skip=skip)


# ----------------------------------------------------------------------------- sweeps

def sweep_store(sweep) -> Store | None:
    """The sweep folder at its URI (None: tune.output_dir is a local folder)."""
    if not is_uri(sweep.tune.output_dir):
        return None
    return resolve(sweep.tune.output_dir, "tune.output_dir").child(sweep.tune.name)


def stage_sweep(sweep, folder: Path, resume: bool, overwrite: bool) -> None:
    """A sweep stored at a URI: the overwrite guard applied to the URI, and the local staging
    folder (`sweep.folder`) emptied; on resume it gets the stored sweep.yaml."""
    store = sweep_store(sweep)
    if store is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    if resume:
        if not store.is_file("sweep.yaml"):
            raise MeerkatError(f"{store.uri}: no interrupted sweep to resume there")
        folder.mkdir(parents=True)
        (folder / "sweep.yaml").write_bytes(store.read_bytes("sweep.yaml"))
    elif store.exists():
        if not overwrite:
            raise MeerkatError(f"{store.uri}: sweep folder already exists (--resume continues it, --overwrite "
                               "replaces it)")
        if not store.is_file("sweep.yaml"):
            raise MeerkatError(f"{store.uri}: not a sweep folder (no sweep.yaml); refusing to replace it")
        store.delete()


def publish(sweep, folder: Path, *names: str) -> None:
    """Upload files the driver wrote in the staging folder to the sweep's URI."""
    store = sweep_store(sweep)
    for name in names if store is not None else ():
        store.upload_file(folder / name, name)


def tune_storage(sweep, folder: Path) -> tuple[str, pafs.FileSystem | None]:
    """Ray Tune's storage_path and storage_filesystem for the sweep folder."""
    store = sweep_store(sweep)
    return (str(folder), None) if store is None else (store.path, store.fs)


def runs_location(sweep, folder: Path) -> str:
    """The output_dir the trials' run folders go to."""
    store = sweep_store(sweep)
    return str(folder / "runs") if store is None else uri_join(store.uri, "runs")


def read_run_file(run_dir: str, name: str) -> bytes | None:
    """A file of a run folder at a path or URI (None if it is not there)."""
    if is_uri(run_dir):
        store = resolve(run_dir, "run_dir")
        return store.read_bytes(name) if store.is_file(name) else None
    path = Path(run_dir) / name
    return path.read_bytes() if path.is_file() else None
