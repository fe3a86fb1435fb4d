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
import secrets
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from .errors import MeerkatError
from .uris import attempt_token, is_uri, uri_join, uri_name, uri_parent

COMMIT_FIRST = "config.yaml"  # uploaded first: a stored folder cut short still says it is a run folder
COMMIT_LAST = "checkpoint.safetensors"  # uploaded after the logs it points into
ATTEMPT_FILE = ".attempt"  # at a stored run folder: the attempt that writes there now (RunStore.claim)


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


def read_run_file(run_dir: str, name: str) -> bytes | None:
    """A file of a run folder at a path or URI (None if it is not there)."""
    if is_uri(run_dir):
        store = resolve(run_dir, "run_dir")
        return store.read_bytes(name) if store.is_file(name) else None
    path = Path(run_dir) / name
    return path.read_bytes() if path.is_file() else None
