"""The package layout's promises: Ray lives in `meerkat_ray/distributed/` only (the core runs,
replays and exports without ever importing it), `executor` names come from the executor
registry alone, and after set-up nothing of size n comes back to the driver of a Ray run."""

import ast
import importlib
import os
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import meerkat_ray
from conftest import TINY_RUN
from meerkat_ray.config import CHOICES, load_config
from meerkat_ray.executors import EXECUTORS

CORE = sorted(m.name for m in pkgutil.walk_packages(meerkat_ray.__path__, "meerkat_ray.")
              if not m.name.startswith("meerkat_ray.distributed") and m.name != "meerkat_ray.__main__")

# a fresh interpreter: import every core module, run a tiny local federation through the CLI, replay
# its run folder, analyse and export it; then say which Ray modules the process had imported
SCRIPT = """
import importlib, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
import torch
from meerkat_ray.cli import main
from meerkat_ray.replay import replay_run
from meerkat_ray.runlog import load_theta
run = sys.argv[3] + "/core"
codes = [main(["run", *sys.argv[2].split(","), "executor=local", "name=core", "output_dir=" + sys.argv[3], "--quiet"]),
         int(not torch.equal(replay_run(run), load_theta(run + "/sparse_final.safetensors"))),
         main(["analyze", run]),
         main(["export", run, sys.argv[3] + "/exported"])]
print(codes, sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports, read from the source with ast (nothing imported):
    every import counts, those inside functions included, except under `if TYPE_CHECKING:`;
    `from .x import y` counts `x.y` when that is a module, else `x` (a package means its __init__)."""
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for name, (path, is_pkg) in files.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        found = set()

        def visit(node):
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
                for child in node.orelse:
                    visit(child)
                return
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


PACKAGE = Path(meerkat_ray.__file__).parent


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert {"meerkat_ray.config", "meerkat_ray.runner", "meerkat_ray.server"} <= set(graph)
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(group) for group in found)


def test_the_circle_finder_sees_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")            # lazy: counts
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nx = 1\n")
    assert circles(import_graph(pkg)) == []
    (pkg / "c.py").write_text("def g():\n    from .a import y\nx = 1\n")
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_config_tree_imports_no_implementation():
    """What `meerkat_ray.config` reaches, transitively: the ground floor only (no torch-level module,
    no algorithm, no orchestration), read from the source."""
    graph = import_graph(PACKAGE)
    reached, todo = set(), ["meerkat_ray.config"]
    while todo:
        for m in graph[todo.pop()] - reached:
            reached.add(m)
            todo.append(m)
    implementations = {"meerkat_ray.algorithms", "meerkat_ray.zo", "meerkat_ray.mask", "meerkat_ray.models",
                       "meerkat_ray.runner", "meerkat_ray.storage", "meerkat_ray.server", "meerkat_ray.client"}
    assert not reached & implementations, sorted(reached & implementations)


def test_only_the_entry_points_call_into_the_orchestration():
    """`runner` orchestrates a run and calls down; the modules that import it are the ones above
    it - the CLI and the Tune trainable - never a layer it calls (tracking gets the run function
    handed down instead)."""
    graph = import_graph(PACKAGE)
    callers = sorted(m for m, imported in graph.items() if "meerkat_ray.runner" in imported)
    assert callers == ["meerkat_ray.cli", "meerkat_ray.distributed.tune"], callers


@pytest.mark.slow
def test_the_core_never_imports_ray(tmp_path):
    run = [*TINY_RUN, "data.num_train=40", "data.num_clients=2", "fed.rounds=1", "fed.local_steps=2",
           "vp.enabled=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(CORE), ",".join(run), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0] []", proc.stdout[-2000:]
    assert (tmp_path / "core" / "summary.json").is_file() and (tmp_path / "exported" / "config.json").is_file()


def test_backend_names_are_the_executor_registry():
    assert CHOICES["executor"] == tuple(EXECUTORS) == ("local", "ray")
    for name, target in EXECUTORS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    assert Path(importlib.import_module(EXECUTORS["ray"].split(":")[0]).__file__).parent.name == "distributed"


@pytest.mark.ray
def test_after_set_up_nothing_of_size_n_comes_back_to_the_driver(ray_cluster, tmp_path, monkeypatch):
    """Full mask of the tiny model: n = 73,728 values (288 KB in fp32). Once the executor has made
    the server, every object the driver gets from any actor (plans, round outcomes, server state,
    evaluation scores, client results, digests at the end) pickles to fewer than n bytes: no copy of
    the global values per round and no pickled server at the end."""
    from meerkat_ray.distributed import executor as ray_executor
    from meerkat_ray.runner import run_experiment

    sizes, started = [], []
    real_get, real_make = ray_cluster.get, ray_executor.RayExecutor.make_server

    def get(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        if started:
            sizes.append(len(pickle.dumps(out)))
        return out

    def make_server(self, *args):
        started.append(True)
        return real_make(self, *args)

    monkeypatch.setattr(ray_cluster, "get", get)
    monkeypatch.setattr(ray_executor.RayExecutor, "make_server", make_server)
    cfg = load_config(None, [*TINY_RUN, "data.num_train=60", "data.num_clients=3", "data.partition=iid",
                             "mask.kind=full", "fed.rounds=2", "fed.local_steps=2", "vp.enabled=false",
                             "executor=ray", "ray.num_actors=1", "ray.cpus_per_client=0.5",
                             f"output_dir={tmp_path}", "name=ray"])
    summary = run_experiment(cfg, progress=False)
    assert summary["mask_size"] == 73728
    assert len(sizes) >= 10 and max(sizes) < summary["mask_size"], sorted(sizes)[-5:]
