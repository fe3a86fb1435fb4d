"""Malformed and non-finite client uploads. The server checks every field of every algorithm's
ClientResult before anything reads it: a refused client is left out of the round, named in
`rejected_clients` and `rejected_reasons` (the reason names the field), and the round goes on.
VPCS leaves out a client without a finite calibration trajectory and says so in the deciding
round's metrics instead of letting one NaN make the population reference NaN.

Results are built by hand; the expected outcome of a refused upload is the contract's: the round
goes exactly as if that client had sent nothing."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from meerkat_ray.algorithms.first_order import ValuesResult
from meerkat_ray.client import ClientWorker
from meerkat_ray.config import VPConfig, load_config
from meerkat_ray.messages import ClientResult
from meerkat_ray.runlog import read_metrics, read_path
from meerkat_ray.runner import run_experiment
from meerkat_ray.server import Server
from meerkat_ray.strategies.strategy import VPState

N, T, K, BAD = 6, 3, 3, 1  # masked values, local steps, clients, the client whose upload is corrupted
NAN = float("nan")


def make_server(algorithm: str, *overrides, g_pre=None, sizes=(10, 20, 30)) -> Server:
    cfg = load_config(None, [f"fed.local_steps={T}", "data.batch_size=4", "vp.enabled=false",
                             f"fed.algorithm={algorithm}", *overrides])
    theta0 = torch.linspace(-1.0, 1.0, N)
    return Server(cfg, theta0, g_pre, list(sizes))


def honest(algorithm: str, plan, grad_ips: list[float] | None = None) -> ClientResult:
    """What an honest client of `algorithm` uploads for `plan` (numbers made up, shapes exact)."""
    k, losses = plan.client, [0.7] * plan.steps
    if algorithm == "first_order":
        return ValuesResult(plan.round, k, [], losses, values=torch.full((N,), 0.1 * (k + 1)), grad_ips=grad_ips)
    return ClientResult(plan.round, k, [0.1 * (k + 1) * (-1) ** t for t in range(plan.steps)], losses)


# Every field an upload carries, broken in each way that once crashed the server or slipped past it.
# (corruption, the field its reason must name)
COMMON = [
    ("not a ClientResult", lambda r: {"round": r.round, "client": r.client}, "ClientResult"),
    ("round None", lambda r: replace(r, round=None), "round"),
    ("client unhashable", lambda r: replace(r, client=[r.client]), "client"),
    ("client of another plan", lambda r: replace(r, client=0), "client"),
    ("losses None", lambda r: replace(r, losses=None), "losses"),
    ("losses a string", lambda r: replace(r, losses="0.7 0.7 0.7"), "losses"),
    ("a loss None", lambda r: replace(r, losses=[0.7, None, 0.7]), "losses"),
    ("a loss a string", lambda r: replace(r, losses=[0.7, "0.7", 0.7]), "losses"),
    ("a loss inf", lambda r: replace(r, losses=[0.7, math.inf, 0.7]), "losses"),
    ("too few losses", lambda r: replace(r, losses=[0.7]), "losses"),
]
ZO = [
    ("scalars None", lambda r: replace(r, scalars=None), "scalars"),
    ("scalars a tensor", lambda r: replace(r, scalars=torch.tensor(r.scalars)), "scalars"),
    ("a scalar a string", lambda r: replace(r, scalars=[0.1, "0.2", 0.3]), "scalars"),
    ("a scalar None", lambda r: replace(r, scalars=[0.1, None, 0.3]), "scalars"),
    ("a scalar complex", lambda r: replace(r, scalars=[0.1, 1j, 0.3]), "scalars"),
    ("a scalar NaN", lambda r: replace(r, scalars=[0.1, NAN, 0.3]), "scalars"),
    ("values, which ZO does not upload", lambda r: ValuesResult(**vars(r), values=torch.zeros(N)), "ValuesResult"),
    ("values not a tensor", lambda r: ValuesResult(**vars(r), values="theta"), "ValuesResult"),
    ("GradIPs, which ZO does not upload", lambda r: ValuesResult(**vars(r), grad_ips=[1.0] * T), "ValuesResult"),
]
FIRST_ORDER = [
    ("scalars, which first_order does not upload", lambda r: replace(r, scalars=[0.5] * T), "scalars"),
    ("a ZO upload", lambda r: ClientResult(r.round, r.client, [0.5] * T, r.losses), "ValuesResult"),
    ("scalars None", lambda r: replace(r, scalars=None), "scalars"),
    ("values None", lambda r: replace(r, values=None), "values"),
    ("values a list", lambda r: replace(r, values=[0.0] * N), "values"),
    ("values a string", lambda r: replace(r, values="theta"), "values"),
    ("values float64", lambda r: replace(r, values=r.values.double()), "values"),
    ("values of the wrong size", lambda r: replace(r, values=torch.zeros(N + 1)), "values"),
    ("a value NaN", lambda r: replace(r, values=torch.tensor([0.0, NAN] + [0.0] * (N - 2))), "values"),
    ("GradIPs without Meerkat-vp", lambda r: replace(r, grad_ips=[1.0] * T), "grad_ips"),
]
FIRST_ORDER_VP = [  # Meerkat-vp on: the client reports one finite GradIP per step
    ("no GradIPs", lambda r: replace(r, grad_ips=None), "grad_ips"),
    ("GradIPs an int", lambda r: replace(r, grad_ips=5), "grad_ips"),
    ("a GradIP a string", lambda r: replace(r, grad_ips=["1.0"] * T), "grad_ips"),
    ("a GradIP NaN", lambda r: replace(r, grad_ips=[1.0, NAN, 1.0]), "grad_ips"),
    ("a GradIP inf", lambda r: replace(r, grad_ips=[1.0, -math.inf, 1.0]), "grad_ips"),
    ("too few GradIPs", lambda r: replace(r, grad_ips=[1.0]), "grad_ips"),
]
CASES = ([("sparse_zo", False, *c) for c in COMMON + ZO] + [("lora_zo", False, *c) for c in COMMON + ZO]
         + [("first_order", False, *c) for c in COMMON + FIRST_ORDER]
         + [("first_order", True, *c) for c in FIRST_ORDER_VP])


@pytest.mark.parametrize("algorithm, vp, what, corrupt, field", CASES,
                         ids=[f"{a}{'-vp' if v else ''}: {w}" for a, v, w, _, _ in CASES])
def test_a_malformed_upload_is_refused_by_name_and_the_round_goes_on_without_it(algorithm, vp, what, corrupt, field):
    overrides = ["vp.enabled=true", f"vp.calib_steps={T}"] if vp else []
    g_pre = torch.ones(N) if vp else None
    server, twin = (make_server(algorithm, *overrides, g_pre=g_pre) for _ in range(2))
    plans = server.plan_round(1)
    assert twin.plan_round(1) == plans
    grad_ips = {k: [1.0 + k, 0.5, 0.25 + k] for k in range(K)} if vp else {}
    results = [honest(algorithm, p, grad_ips.get(p.client)) for p in plans]
    results[BAD] = corrupt(results[BAD])
    silent = [None if k == BAD else r for k, r in enumerate(results)]

    outcome = server.finish_round(1, plans, results)
    expected = twin.finish_round(1, plans, silent)  # refused = as if the client had sent nothing

    m = outcome.metrics
    assert m["rejected_clients"] == [BAD], what
    assert field in m["rejected_reasons"][str(BAD)] and "\n" not in m["rejected_reasons"][str(BAD)]
    assert outcome.path_rows.equals(expected.path_rows) and torch.equal(server.theta, twin.theta)
    assert m["train_loss"] == expected.metrics["train_loss"] and m["local_steps"] == expected.metrics["local_steps"]
    assert m["uplink_bytes"] >= expected.metrics["uplink_bytes"]  # what was sent is counted, without failing


@pytest.mark.parametrize("algorithm", ["sparse_zo", "lora_zo", "first_order"])
def test_honest_uploads_of_every_algorithm_pass_the_checks(algorithm):
    for vp in ([False, True] if algorithm == "first_order" else [False]):
        server = make_server(algorithm, *(["vp.enabled=true", f"vp.calib_steps={T}"] if vp else []),
                             g_pre=torch.ones(N) if vp else None)
        plans = server.plan_round(1)
        results = [honest(algorithm, p, [0.5] * p.steps if vp else None) for p in plans]
        results[0] = replace(results[0], losses=tuple(results[0].losses))   # a tuple is a sequence too
        results[1] = replace(results[1], losses=[np.float64(v) for v in results[1].losses])  # numpy numbers are numbers
        assert server.finish_round(1, plans, results).metrics["rejected_clients"] == []


# ----------------------------------------------------------------------------- VPCS and non-finite GradIP

def decaying(t: np.ndarray) -> np.ndarray:
    return np.exp(-t / 2)


def oscillating(t: np.ndarray, k: int) -> np.ndarray:
    return (1.0 + 0.5 * np.sin(t + k)) * (-1.0) ** t


def test_vpcs_leaves_out_a_non_finite_trajectory_and_still_flags_the_decaying_client():
    """Client 0 decays, 1-3 oscillate, client 2's trajectory holds a NaN (say its GradIP overflowed
    on the server): the others' decision is the one they would get without client 2 at all."""
    t = np.arange(12)
    series = {0: decaying(t), 1: oscillating(t, 1), 2: oscillating(t, 2), 3: oscillating(t, 3)}
    series[2][7] = NAN
    state = VPState(VPConfig(calib_steps=12), num_clients=4, seed=0)
    for k, v in series.items():
        state.record(k, list(v))
    assert state.maybe_decide(1, planned_steps=12)
    without = VPState(VPConfig(calib_steps=12), num_clients=4, seed=0)
    for k in (0, 1, 3):
        without.record(k, list(series[k]))
    without.record(2, list(series[2][:1]))
    assert without.maybe_decide(1, planned_steps=12)
    assert sorted(state.stats) == [0, 1, 3] and state.stats == without.stats
    assert state.stats[0]["quiet_fraction"] == 1.0  # decided against a finite population reference
    assert list(state.left_out) == [2] and "non-finite" in state.left_out[2] and "step 7" in state.left_out[2]
    assert "1 of 12" in without.left_out[2]  # a trajectory cut short is left out, and said to be


def test_the_deciding_round_reports_a_client_left_out_for_a_refused_non_finite_grad_ip():
    """first_order under Meerkat-vp: client 2 reports a NaN GradIP in the calibration round; it is
    refused, VPCS decides without it (flagging the decaying client 0) and the metrics say so."""
    server = make_server("first_order", "vp.enabled=true", "vp.calib_steps=12", g_pre=torch.ones(N),
                         sizes=[40] * 4)
    plans = server.plan_round(1)
    assert [p.steps for p in plans] == [12] * 4
    t = np.arange(12)
    series = {0: decaying(t), 1: oscillating(t, 1), 2: oscillating(t, 2), 3: oscillating(t, 3)}
    series[2][5] = NAN
    results = [honest("first_order", p, [float(v) for v in series[p.client]]) for p in plans]
    m = server.finish_round(1, plans, results).metrics
    assert m["rejected_clients"] == [2] and "grad_ips" in m["rejected_reasons"]["2"]
    assert m["vp_decided"] and m["flagged_clients"] == [0] and sorted(m["vpcs"]) == ["0", "1", "3"]
    assert m["vpcs_left_out_clients"] == [2] and "0 of 12" in m["vpcs_left_out_reasons"]["2"]
    assert server.state_dict()["vp"]["left_out"] == {"2": m["vpcs_left_out_reasons"]["2"]}  # kept for the summary


def test_a_non_finite_g_pre_leaves_every_client_out_and_says_so():
    """A g_pre with a NaN makes every GradIP NaN: VPCS decides, flags no one, and names every client
    as left out (before, the NaN population reference flagged no one without a word)."""
    g_pre = torch.ones(N)
    g_pre[3] = NAN
    server = make_server("sparse_zo", "vp.enabled=true", f"vp.calib_steps={T}", g_pre=g_pre)
    plans = server.plan_round(1)
    m = server.finish_round(1, plans, [honest("sparse_zo", p) for p in plans]).metrics
    assert m["rejected_clients"] == [] and m["vp_decided"] and m["flagged_clients"] == [] and m["vpcs"] == {}
    assert m["vpcs_left_out_clients"] == [0, 1, 2]
    assert all("non-finite" in m["vpcs_left_out_reasons"][str(k)] for k in range(K))


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_run_with_corrupt_uploads_refuses_them_every_round_and_finishes(monkeypatch, tmp_path):
    """Client 1 uploads scalars None, client 2 adds masked values a ZO client never sends: both are
    refused in every round by name, and the run trains on the other clients."""
    honest_run = ClientWorker.run

    def run(self, plan):
        result = honest_run(self, plan)
        if plan.client == 1:
            return replace(result, scalars=None)
        if plan.client == 2:
            return ValuesResult(**vars(result), values=self.theta_global.clone())
        return result

    monkeypatch.setattr(ClientWorker, "run", run)
    cfg = load_config(None, [*TINY_RUN, "data.num_train=80", "data.num_clients=4", "data.partition=iid",
                             "fed.rounds=2", "fed.local_steps=2", "fed.eval_every=2", "vp.enabled=false",
                             "executor=local", "name=corrupt", f"output_dir={tmp_path}"])
    run_experiment(cfg, progress=False)
    rounds = read_metrics(tmp_path / "corrupt")[1:]
    assert [m["rejected_clients"] for m in rounds] == [[1, 2]] * 2
    assert all("scalars" in m["rejected_reasons"]["1"] and "ValuesResult" in m["rejected_reasons"]["2"] for m in rounds)
    assert set(read_path(tmp_path / "corrupt")["client"]) == {0, 3}
