"""`meerkat-ray analyze` on real tiny run folders: a run, a sweep folder, a folder of runs of
different methods; the report embeds every figure it writes; the analysis never imports training
code; bad input is one `error:` line. Also the random early-stopping baseline end to end: it stops
as many clients as VPCS flags on the same trajectories."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FLAG_ALL, run_folder  # FLAG_ALL: VPCS flags every client

from meerkat_ray.cli import main
from meerkat_ray.runlog import read_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T, ROUNDS, K = 2, 3, 4
TINY = [  # a federation of a few seconds: tiny model, 4 clients of which 2 single-label
    "model.name=tiny-llama", "model.num_threads=1", "executor=local", "data.task=tweets2",
    "data.num_train=96", "data.num_test=16", f"data.num_clients={K}", "data.partition=mixed",
    "data.extreme_fraction=0.5", "data.batch_size=2", "data.max_length=24", "mask.density=0.01",
    "mask.calib_num_seqs=2", "mask.calib_seq_len=24", "mask.calib_batch_size=2", f"fed.rounds={ROUNDS}",
    f"fed.local_steps={T}", "fed.eval_every=1", "zo.lr=1e-2", "vp.enabled=true", f"vp.calib_steps={2 * T}",
    "vp.calibration=rounds",  # calibration over 2 rounds: the decision comes after round 2
]
GRID = {"fed.local_steps": [1, 2], "vp.sigma": [0.5, 1e6]}  # the tiny sweep: 2 x 2


def tiny_run(output_dir: Path, name: str, *extra: str) -> Path:
    return run_folder(TINY, output_dir, name, *extra)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep folder laid out as `meerkat-ray tune` writes it (sweep.yaml + runs/<trial>/), its
    trials run in this process: a 2 x 2 grid over T and sigma (sigma = 1e6 makes every late step quiet)."""
    folder = tmp_path_factory.mktemp("sweeps") / "tiny"
    (folder / "runs").mkdir(parents=True)
    base = {"vp": {"rho": 1e-6, "min_quiet_fraction": 0.0}}
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"base": base, "grid": GRID, "tune": {"metric": "accuracy"},
                                                       "source": "tiny.yaml"}, sort_keys=False))
    for i, (steps, sigma) in enumerate((s, g) for s in GRID["fed.local_steps"] for g in GRID["vp.sigma"]):
        tiny_run(folder / "runs", f"{i:05d}_local_steps={steps}_sigma={sigma:g}", "vp.rho=1e-6",
                 "vp.min_quiet_fraction=0", f"fed.local_steps={steps}", f"vp.sigma={sigma}",
                 f"vp.calib_steps={2 * steps}")
    return folder


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory) -> Path:
    """A folder of run folders comparing methods: Meerkat-vp, random early stopping, Full-FedZO."""
    root = tmp_path_factory.mktemp("compare")
    # VPCS must flag some clients but not all: a probe run (flags all) records every client's
    # rho_later; with every late step quiet (sigma 1e6), rho at their median flags the upper half.
    probe = tiny_run(tmp_path_factory.mktemp("probe"), "probe", *FLAG_ALL)
    rhos = sorted(s["rho_later"] for s in json.loads((probe / "summary.json").read_text())["vpcs"].values())
    assert len(rhos) == K and rhos[K // 2 - 1] < rhos[K // 2], rhos
    rho = f"vp.rho={(rhos[K // 2 - 1] + rhos[K // 2]) / 2!r}"
    tiny_run(root, "meerkat-vp", "vp.sigma=1e6", rho, "vp.min_quiet_fraction=0")
    tiny_run(root, "random-stop", "vp.sigma=1e6", rho, "vp.min_quiet_fraction=0", "vp.policy=random")
    tiny_run(root, "full", "mask.kind=full", "vp.enabled=false")
    return root


def check_report(out: Path, expected: set[str]) -> str:
    """Every expected figure is a non-empty PNG, and the report embeds exactly the PNGs written."""
    pngs = {p.name for p in out.glob("*.png")}
    assert expected <= pngs, expected - pngs
    page = (out / "report.html").read_text()
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert base64.b64encode(data).decode() in page, f"{name} is not embedded"
        assert f'href="{name}"' in page
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<script>" in page and "src=\"http" not in page  # self-contained: nothing to fetch
    return page


def test_analyze_a_run_folder(sweep_dir, capsys):
    run = sweep_dir / "runs" / "00003_local_steps=2_sigma=1e+06"
    out = run / "analysis"
    assert main(["analyze", str(run)]) == 0  # default: DIR/analysis
    assert capsys.readouterr().out.strip() == f"wrote {out / 'report.html'} (5 figures beside it)"
    (out / "stale.png").write_bytes(PNG_MAGIC)  # not one of this report's figures
    assert main(["analyze", str(run), "--out", str(out)]) == 0
    assert not (out / "stale.png").exists()  # an old report's figures are replaced, never left stale
    page = check_report(out, {"curves.png", "accuracy_vs_uplink.png", "gradip.png", "vpcs.png",
                              "vpcs_confusion.png"})
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["flagged_clients"]) == list(range(K))  # the thresholds flag everyone
    assert "Meerkat-vp" in page and "precision" in page and "recall" in page
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 1 and runs["final_accuracy"][0] == pytest.approx(summary["final_accuracy"])
    # 2 truly extreme of 4, all flagged: precision 0.5, recall 1
    assert runs["flag_precision"][0] == 0.5 and runs["flag_recall"][0] == 1.0


def test_analyze_a_sweep_folder_in_a_process_that_never_imports_training_code(sweep_dir, tmp_path):
    """The analysis (and the CLI on its way to it) reads files only: no torch, Ray, transformers or
    training modules in its process afterwards. Its report has every figure of a sweep."""
    out = tmp_path / "out"
    code = f"""
import sys
from meerkat_ray.cli import main
assert main(["analyze", {str(sweep_dir)!r}, "--out", {str(out)!r}]) == 0
banned = ("torch", "ray", "transformers", "safetensors", "meerkat_ray.runner", "meerkat_ray.zo", "meerkat_ray.models",
          "meerkat_ray.config", "meerkat_ray.server")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in banned or m in banned)
print("LOADED", loaded)
assert not loaded, loaded
assert "analysis.figures" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    heatmaps = {f"heatmap_{v}_fed.local_steps_vp.sigma.png" for v in ("final_accuracy", "flag_precision", "flag_recall")}
    gradips = {f"{kind}_{i:02d}_{d.name}.png" for i, d in enumerate(sorted((sweep_dir / "runs").iterdir()))
               for kind in ("gradip", "vpcs")}
    page = check_report(out, {"curves.png", "accuracy_vs_uplink.png", "vpcs_confusion.png", *heatmaps, *gradips})
    assert 'class="sortable"' in page and "addEventListener(\"click\"" in page
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and set(zip(runs["fed.local_steps"], runs["vp.sigma"])) == {(1, 0.5), (1, 1e6), (2, 0.5),
                                                                                       (2, 1e6)}
    for row in runs.to_dict("records"):
        summary = json.loads((sweep_dir / "runs" / row["run"] / "summary.json").read_text())
        assert row["final_accuracy"] == pytest.approx(summary["final_accuracy"])
        steps, sigma = row["fed.local_steps"], row["vp.sigma"]
        assert row["label"] == f"Meerkat-vp (T={steps}, σ={sigma:g}, calib_steps={2 * steps})"  # the keys that vary


def test_analyze_a_folder_of_runs_draws_one_line_per_method(method_runs, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", str(method_runs), "--out", str(out)]) == 0
    check_report(out, {"curves.png", "accuracy_vs_uplink.png", "vpcs_confusion.png"})
    runs = pd.read_csv(out / "runs.csv").set_index("run")
    assert runs["method"].to_dict() == {"full": "Full-FedZO", "meerkat-vp": "Meerkat-vp",
                                        "random-stop": "Meerkat + random stop"}
    # the lines: the method, plus the keys that differ besides the method keys (none here)
    assert set(runs["label"]) == {"Full-FedZO", "Meerkat-vp", "Meerkat + random stop"}


def test_random_stopping_stops_as_many_clients_as_vpcs_on_the_same_trajectories(method_runs):
    """Until the decision both runs are the same federation (nobody is stopped yet, same seeds), so
    the random policy sees the trajectories VPCS saw and stops as many clients."""
    vp, rnd = (json.loads((method_runs / name / "summary.json").read_text()) for name in ("meerkat-vp", "random-stop"))
    assert vp["vp_decided_round"] == rnd["vp_decided_round"] == 2  # calib_steps = 2 rounds of T steps
    assert len(rnd["flagged_clients"]) == len(vp["flagged_clients"]) == K // 2
    decided = vp["vp_decided_round"]
    paths = [read_path(method_runs / name) for name in ("meerkat-vp", "random-stop")]
    before = [p[p["round"] <= decided].reset_index(drop=True) for p in paths]
    pd.testing.assert_frame_equal(before[0], before[1])
    for path, summary in zip(paths, (vp, rnd)):  # afterwards the stopped clients run 1 step per round
        steps = path[path["round"] > decided].groupby("client").size()
        assert all(steps[k] == (1 if k in summary["flagged_clients"] else T) * (ROUNDS - decided) for k in range(K))


@pytest.mark.parametrize("make, says", [
    (lambda d: d, "not a run folder"),                                        # an empty folder
    (lambda d: d / "missing", "no such folder"),
    (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "not a folder"),
    (lambda d: _broken_run(d), "metrics.jsonl"),
])
def test_bad_input_is_one_error_line_and_status_2(tmp_path, capsys, make, says):
    target = make(tmp_path)
    assert main(["analyze", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def _broken_run(folder: Path) -> Path:
    run = folder / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    (run / "metrics.jsonl").write_text('{"round": 0, "accuracy": 0.5}\n{"round": 1, "acc')  # cut mid-line
    return run
