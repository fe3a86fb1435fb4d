"""The report `make demo` leads to, on a tiny run shaped like the demo (the default rounds,
evaluation schedule, clients, partition and round-1 VPCS calibration; a tiny model and few steps):
the data behind each figure, not its pixels. Every evaluation is drawn, the zero-shot point
included; the train loss keeps the never-flagged and the flagged clients apart; the GradIP figure
draws each round as its own segment; every figure has a caption that says what it shows."""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import FLAG_ALL, assert_same_run, run_folder

from analysis import analyze
from meerkat_ray.config import load_config

pytestmark = pytest.mark.slow
T, CALIB = 3, 6
DEMO_SHAPED = [  # everything else is the embedded default's: 6 clients (2 single-label), R, eval_every, calibration
    "model.name=tiny-llama", "model.num_threads=1", "executor=local", "data.num_train=240", "data.num_test=24",
    "data.batch_size=2", "data.max_length=24", "mask.density=0.01", "mask.calib_num_seqs=2", "mask.calib_seq_len=24",
    "mask.calib_batch_size=2", "zo.lr=1e-2", f"fed.local_steps={T}", f"vp.calib_steps={CALIB}",
]


def demo_run(output_dir: Path, name: str, *extra: str) -> Path:
    return run_folder(DEMO_SHAPED, output_dir, name, *extra)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """VPCS flags some clients but not all: a one-round probe (flags all) gives every client's
    rho_later; with every late step quiet (sigma 1e6), rho between their middle two flags the upper half."""
    probe = demo_run(tmp_path_factory.mktemp("probe"), "probe", *FLAG_ALL, "fed.rounds=1")
    rhos = sorted(s["rho_later"] for s in json.loads((probe / "summary.json").read_text())["vpcs"].values())
    middle = len(rhos) // 2
    assert rhos[middle - 1] < rhos[middle], rhos
    return demo_run(tmp_path_factory.mktemp("runs"), "demo", "vp.sigma=1e6", "vp.min_quiet_fraction=0",
                    f"vp.rho={(rhos[middle - 1] + rhos[middle]) / 2!r}")


def records(run: Path) -> tuple[list[dict], dict]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return metrics, json.loads((run / "summary.json").read_text())


def test_the_demo_report_draws_every_evaluation_both_client_groups_and_each_round(demo, tmp_path):
    metrics, summary = records(demo)
    rounds, decided, flagged = summary["rounds"], summary["vp_decided_round"], summary["flagged_clients"]
    clients = list(range(len(json.loads((demo / "clients.json").read_text()))))
    never = [k for k in clients if k not in flagged]
    assert decided == 1 and 0 < len(flagged) < len(clients)  # calibration in round 1; both groups exist
    evaluated = [m["round"] for m in metrics if m.get("accuracy") is not None]
    # the default schedule evaluates zero-shot, after the calibration round and at the end
    assert evaluated[0] == 0 and evaluated[-1] == rounds and any(decided <= r < rounds for r in evaluated), evaluated
    report = analyze(demo, tmp_path / "out")
    plots = report.plots
    assert set(plots) == {"curves.png", "accuracy_vs_uplink.png", "gradip.png", "vpcs.png", "vpcs_confusion.png"}

    # accuracy vs round and vs uplink: every evaluation, the zero-shot point at 0 bytes
    accuracy = {m["round"]: m["accuracy"] for m in metrics if m.get("accuracy") is not None}
    cum_bytes, total = {}, 0
    for m in metrics:
        total += m["uplink_bytes"]
        cum_bytes[m["round"]] = total
    (acc,) = plots["curves.png"].on("accuracy")
    assert acc.x == evaluated and acc.y == pytest.approx([accuracy[r] for r in evaluated])
    (uplink,) = plots["accuracy_vs_uplink.png"].on("uplink")
    assert uplink.x == [cum_bytes[r] for r in evaluated] and uplink.x[0] == 0
    assert uplink.y == pytest.approx([accuracy[r] for r in evaluated])
    marks = plots["accuracy_vs_uplink.png"].marks
    assert marks["xscale"] == "symlog" and 0 < marks["linthresh"] <= min(b for b in uplink.x if b > 0)
    assert plots["accuracy_vs_uplink.png"].fig.axes[0].get_xscale() == "symlog"

    # train loss: one line over the never-flagged clients, one over the flagged ones, every round
    lines = {s.meta["line"]: s for s in plots["curves.png"].on("train_loss")}
    assert set(lines) == {"never flagged", "flagged"}
    for name, members in (("never flagged", never), ("flagged", flagged)):
        line = lines[name]
        assert line.meta["clients"] == members and line.x == list(range(1, rounds + 1))
        want = [sum(m["client_train_loss"][str(k)] for k in members) / len(members) for m in metrics[1:]]
        assert line.y == pytest.approx(want)
        assert name in line.label and line.label in plots["curves.png"].caption  # the caption names each line
    assert plots["curves.png"].marks["calibration_rounds"] == [decided]

    # GradIP: one segment per client and round, widths CALIB then T; flagged clients 1 step (a dot) later
    gradip = plots["gradip.png"]
    spans = gradip.marks["round_spans"]
    widths = [CALIB] + [T] * (rounds - 1)
    starts = [0.5 + sum(widths[:i]) for i in range(rounds)]
    assert gradip.marks["rounds"] == list(range(1, rounds + 1))
    assert [spans[r][0] for r in range(1, rounds + 1)] == starts
    assert gradip.marks["boundaries"] == starts[1:] and gradip.marks["decision"] == starts[1]
    segments = {(s.meta["client"], s.meta["round"]): s for s in gradip.on("grad_ip")}
    assert set(segments) == {(k, r) for k in clients for r in range(1, rounds + 1)}
    for (k, r), seg in segments.items():
        steps = CALIB if r == 1 else (1 if k in flagged else T)
        assert len(seg.x) == steps, (k, r)
        assert spans[r][0] < min(seg.x) and max(seg.x) < spans[r][1]  # inside its own round's segment
        assert (seg.meta["marker"] is not None) == (steps == 1)     # a lone step is drawn as a dot
    assert len(gradip.on("abs_grad_ip")) == len(segments)

    # the confusion table is the run's decision
    (table,) = plots["vpcs_confusion.png"].marks["tables"]
    extreme = set(summary["extreme_clients"])
    assert (table["tp"], table["fp"]) == (len(extreme & set(flagged)), len(set(flagged) - extreme))

    # every figure in the page has a caption that names what it is over
    page = report.html.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, flags=re.S)
    assert len(captions) == len(plots) == page.count("<figure>")
    n = summary["num_test"]
    for file in ("curves.png", "accuracy_vs_uplink.png"):
        assert f"{n} held-out examples" in plots[file].caption and "round 0 (zero-shot)" in plots[file].caption
    for caption in (plots["curves.png"].caption, plots["gradip.png"].caption):
        assert f"rounds 1-{rounds}" in caption
    assert "flagged clients" in plots["gradip.png"].caption


def test_evaluating_every_round_leaves_training_bit_identical(demo, tmp_path):
    """Evaluation reads the global model and never changes it: the demo-shaped run evaluated at the
    default schedule trains exactly like the same run evaluated only at the end."""
    cfg = load_config(str(demo / "config.yaml"), [])
    assert cfg.fed.eval_every < cfg.fed.rounds  # the default evaluates before the end
    other = demo_run(tmp_path, "demo", "vp.sigma=1e6", "vp.min_quiet_fraction=0", f"vp.rho={cfg.vp.rho!r}",
                     f"fed.eval_every={cfg.fed.rounds}")
    evaluated = [m["round"] for m in records(other)[0] if m.get("accuracy") is not None]
    assert evaluated == [0, cfg.fed.rounds]
    assert_same_run(demo, other, ignore=("accuracy", "test_loss"))


def test_a_run_without_per_client_losses_gets_one_loss_line_that_says_so(demo, tmp_path):
    """Run folders written before client_train_loss was recorded: the round's mean over all steps,
    labelled as such (never a split that the file cannot support)."""
    old = tmp_path / "old"
    shutil.copytree(demo, old, ignore=shutil.ignore_patterns("analysis"))
    rows = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in m.items() if k != "client_train_loss"})
                                               + "\n" for m in rows))
    plot = analyze(old, tmp_path / "out").plots["curves.png"]
    (line,) = plot.on("train_loss")
    assert line.meta["clients"] is None and "all steps of all clients" in line.label
    assert line.y == pytest.approx([m["train_loss"] for m in rows[1:]])
    assert line.label in plot.caption


def test_the_decision_figure_draws_each_clients_relative_level_and_its_threshold(tmp_path):
    """vp.rule=stepwise: each judged client's panel is its relative level r_k^t = log|GradIP_k^t| minus
    the median over clients at step t (recomputed here from path.parquet), and its dotted line is
    the late level at which its z reaches -outlier_z: start_k + median_j decay_j - outlier_z x spread."""
    import math
    import statistics

    from analysis.report import analyze

    run = demo_run(tmp_path, "stepwise", "fed.rounds=1", "fed.eval_every=1", "vp.rule=stepwise")
    report = analyze(run, tmp_path / "out")
    plot = report.plots["vpcs.png"]
    path = __import__("pandas").read_parquet(run / "path.parquet").sort_values(["client", "step"])
    logs = {int(k): [math.log(abs(v)) for v in g["grad_ip"]] for k, g in path.groupby("client")}
    med = [statistics.median(v[t] for v in logs.values()) for t in range(CALIB)]
    rel = {k: [v[t] - med[t] for t in range(CALIB)] for k, v in logs.items()}
    early, late = round(0.2 * CALIB), round(0.5 * CALIB)
    start = {k: statistics.median(r[:early]) for k, r in rel.items()}
    decay = {k: statistics.median(r[-late:]) - start[k] for k, r in rel.items()}
    stats = json.loads((run / "summary.json").read_text())["vpcs"]
    spread = stats["0"]["spread"]
    for series in plot.on("trajectory"):
        k = series.meta["client"]
        assert series.y == pytest.approx(rel[k], rel=1e-9, abs=1e-12)
        expected = start[k] + statistics.median(decay.values()) - 3.5 * spread
        assert plot.marks["thresholds"][k] == pytest.approx(expected, rel=1e-9)
    assert plot.marks["rule"] == "stepwise" and len(plot.on("trajectory")) == 6
    assert "stepwise" in plot.caption and "vpcs.png" in (tmp_path / "out" / "report.html").read_text()
