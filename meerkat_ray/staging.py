"""A sweep folder at a storage URI (`tune.output_dir`): checked there, staged in a local folder the
driver writes, and published back (`storage` holds the stores; `distributed/tune.py` the sweep)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs as pafs

from .errors import MeerkatError
from .storage import Store, resolve
from .uris import is_uri, uri_join


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
