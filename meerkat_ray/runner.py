"""One federated experiment: set-up, the round loop, the run folder, the summary.

The round loop is written once (`federate`); where clients and server run is the executor of
`executor` (`executors.py`: `local_executor` in this process, `distributed.executor` on Ray).
Per round:
    plans = server.plan_round(r) -> results = executor.run_clients(plans)
    -> server.finish_planned (checks, replay, GradIP, VPCS, aggregation, bytes) -> the driver applies
    the SyncMessage to its own global values and the executor to every worker
    -> evaluation every `fed.eval_every` rounds -> metrics.jsonl / path.parquet / checkpoint.
The checkpoint holds the driver's values and the server's small JSON state; the summary is built
from that state, never from a copy of the whole server.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .checkpoint import CHECKPOINT_FILE, RunCheckpoint
from .config import Config, to_dict
from .errors import MeerkatError
from .executors import make_executor
from .experiment import DataSetup, prepare_data
from .gradip import flag_quality
from .mask import save_mask
from .messages import measured_s
from .models import cache_root
from .storage import ATTEMPT_FILE, RunStore, resolve
from .uris import is_uri, remove_dead_attempts
from .runlog import RunWriter, load_theta, remove_owned_folder, save_theta, theta_digest, write_json


def check_writable_dir(path: Path, key: str) -> None:
    """`path` is, or can become, a folder this process writes in (checked before any model loads)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise MeerkatError(f"{key}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MeerkatError(f"{key}: {probe} is not writable")


EXISTS = "run folder already exists (--resume continues it, --overwrite replaces it)"


def prepare_run_dir(cfg: Config, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    if run_dir.exists():
        if not overwrite:
            raise MeerkatError(f"{run_dir}: {EXISTS}")
        remove_owned_folder(run_dir, "config.yaml", "run")
    run_dir.mkdir(parents=True)
    return run_dir


@dataclass
class LoopEnd:
    """What the round loop leaves: the last evaluation record, the server's state and the driver's
    global values after the last round."""
    last: dict
    state: dict
    theta: torch.Tensor


def federate(cfg: Config, server, executor, writer: RunWriter, theta: torch.Tensor, progress: bool = True,
             on_round=None, resume: RunCheckpoint | None = None, extreme_clients: list[int] | None = None,
             commit=None) -> LoopEnd:
    """The round loop from the global values `theta` (theta_0, or the checkpoint's on `resume`).

    The driver applies each round's SyncMessage to its own copy of the global values, so nothing of
    size n comes back from the server. `on_round(round, metrics, last, checkpoint)` runs after each
    round's files and its RunCheckpoint are written (Tune reports from `metrics` and `last`, which
    carries the cumulative bytes); `resume` continues after the checkpoint's round. After the
    zero-shot evaluation and after every round the run folder's checkpoint is replaced (atomically).
    `extreme_clients` (when the partition knows them) scores the VPCS decision in the round it is made.
    `commit()` runs right after every checkpoint is written, round 0's included, before `on_round`
    (a run stored at a URI uploads there).
    """
    cfg_dict = to_dict(cfg)
    theta = theta.clone()

    def checkpoint(round_: int) -> RunCheckpoint:
        saved = RunCheckpoint(round_, dict(last), server.state_dict(), theta, cfg_dict)
        saved.save(writer.dir)
        if commit is not None:
            commit()
        return saved

    if resume is None:
        acc0, loss0 = executor.evaluate()
        writer.add_round({"round": 0, "train_loss": None, "accuracy": acc0, "test_loss": loss0, "uplink_bytes": 0,
                          "downlink_bytes": 0, "flagged_clients": [], "wall_s": 0.0}, None)
        if progress:
            print(f"round 0 (zero-shot): accuracy {acc0:.3f}  test loss {loss0:.4f}", flush=True)
        last = {"accuracy": acc0, "test_loss": loss0, "zero_shot_accuracy": acc0, "best_accuracy": acc0,
                "uplink_bytes": 0, "downlink_bytes": 0}
        saved = checkpoint(0)
    else:
        saved = resume
        last = {"uplink_bytes": resume.server["uplink_bytes"], "downlink_bytes": resume.server["downlink_bytes"],
                **resume.last}
    start = time.perf_counter()
    for r in range((resume.round if resume else 0) + 1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        plans = server.plan_round(r)
        bar = tqdm(total=sum(p.steps for p in plans), desc=f"round {r}/{cfg.fed.rounds}", unit="step",
                   disable=not progress, leave=True, dynamic_ncols=True)
        results = executor.run_clients(plans, on_result=lambda res: bar.update(steps_reported(res)))
        outcome = server.finish_planned(r, results)
        theta = executor.sync(outcome.sync, theta)  # every worker's and the driver's values after the round
        metrics = round_metrics(cfg, r, outcome.metrics, results, executor, extreme_clients, progress)
        if "accuracy" in metrics:
            last.update(accuracy=metrics["accuracy"], test_loss=metrics["test_loss"],
                        best_accuracy=max(last["best_accuracy"], metrics["accuracy"]))
        last["uplink_bytes"] += metrics["uplink_bytes"]
        last["downlink_bytes"] += metrics["downlink_bytes"]
        metrics["wall_s"] = round(time.perf_counter() - t0, 3)
        writer.add_round(metrics, outcome.path_rows)
        saved = checkpoint(r)
        bar.set_postfix(loss=_fmt(metrics.get("train_loss")), acc=_fmt(metrics.get("accuracy")),
                        flagged=len(metrics["flagged_clients"]))
        bar.close()
        if on_round:
            on_round(r, metrics, last, saved)
    last["train_wall_s"] = time.perf_counter() - start
    return LoopEnd(last=last, state=saved.server, theta=theta)


def round_metrics(cfg: Config, round_: int, server_metrics: dict, results, executor, extreme_clients,
                  progress: bool) -> dict:
    """One round's metrics.jsonl record: the server's part, the decision's quality, the evaluation
    (every `fed.eval_every` rounds and the last), compute time and fault counters."""
    metrics = dict(server_metrics)
    if metrics.get("vp_decided"):
        if extreme_clients is not None:
            metrics["flagging"] = flag_quality(metrics["flagged_clients"], extreme_clients)
        if progress:
            tqdm.write(decision_line(round_, metrics, extreme_clients))
    if round_ % cfg.fed.eval_every == 0 or round_ == cfg.fed.rounds:
        metrics["accuracy"], metrics["test_loss"] = executor.evaluate()
    metrics["compute_s"] = round(sum(map(measured_s, results)), 3)
    metrics.update(executor.fault_counts())  # client actors lost and clients re-run this round
    return metrics


def steps_reported(result) -> int:
    """Steps a result says it ran, for the progress bar only (a malformed one counts none; the
    server's checks decide what it is worth)."""
    losses = getattr(result, "losses", None)
    if isinstance(losses, (list, tuple)) and losses:
        return len(losses)
    scalars = getattr(result, "scalars", None)  # a private run uploads no losses: one scalar per step
    return len(scalars) if isinstance(scalars, (list, tuple)) else 0


def decision_line(round_: int, metrics: dict, extreme_clients: list[int] | None) -> str:
    stats = metrics.get("vpcs") or {}
    names = list(next(iter(stats.values()), {}))[:2]  # the rule's first two statistics
    per_client = " ".join(f"{k}:" + "/".join(f"{s[n]:.2f}" for n in names) for k, s in stats.items())
    line = f"VPCS decided after round {round_}: flagged {metrics['flagged_clients']}"
    if extreme_clients is not None:
        f = metrics["flagging"]
        line += f" (truly extreme {extreme_clients}: precision {_fmt(f['precision'])}, recall {_fmt(f['recall'])})"
    left_out = metrics.get("vpcs_left_out_reasons") or {}
    if left_out:
        line += "\n  left out of the decision: " + ", ".join(f"{k} ({why})" for k, why in left_out.items())
    return line + f"\n  per client {'/'.join(names)}: {per_client}"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def open_run_dir(cfg: Config, data: DataSetup, mask, theta0: torch.Tensor, run_dir: Path | None,
                 resume: RunCheckpoint | None) -> RunWriter:
    """The new (empty) `run_dir` with its set-up files, or (resume) the existing folder cut back to
    the checkpoint."""
    if resume is not None:
        check_same_setup(cfg.run_dir, mask, theta0)
        return resume.reopen_writer(cfg.run_dir)
    writer = RunWriter(run_dir)
    writer.write_config(to_dict(cfg))
    save_mask(mask, run_dir / "mask.safetensors")
    save_theta(run_dir / "sparse_init.safetensors", theta0)
    write_json(run_dir / "clients.json", data.client_table())
    return writer


def check_same_setup(run_dir: Path, mask, theta0: torch.Tensor) -> None:
    """A resumed run must rebuild the mask and theta_0 its folder was started with."""
    from .mask import load_mask

    saved = load_mask(run_dir / "mask.safetensors")
    if list(saved.indices) != list(mask.indices) or any(not torch.equal(saved.indices[k], v)
                                                        for k, v in mask.indices.items()):
        raise MeerkatError(f"{run_dir / 'mask.safetensors'}: differs from the mask this run's config gives "
                           "(another model, density or mask kind?)")
    if not torch.equal(load_theta(run_dir / "sparse_init.safetensors"), theta0):
        raise MeerkatError(f"{run_dir / 'sparse_init.safetensors'}: differs from the model's values at the mask")


def run_experiment(cfg: Config, overwrite: bool = False, progress: bool = True, on_round=None,
                   resume: RunCheckpoint | None = None, store=None) -> dict:
    """Run one federated experiment end to end and write its run folder. Returns summary.json.

    `on_round` is handed to `federate`; `resume` continues an interrupted run from a checkpoint.
    Data, model and mask are checked before anything is written: a run folder that `overwrite`
    replaces is removed only after that. `store` (a run kept at a URI, `storage.RunStore`) is told
    then (`prepare()`: the stored copy it replaces is deleted) and after every checkpoint (`commit()`).
    A new run folder that fails before its first checkpoint is removed again (nothing to resume).
    """
    t_start = time.perf_counter()
    if resume is None and cfg.run_dir.exists() and not overwrite:
        raise MeerkatError(f"{cfg.run_dir}: {EXISTS}")
    check_writable_dir(Path(cfg.output_dir), "output_dir")
    check_writable_dir(cache_root(cfg.model), "model.cache_dir")
    data = prepare_data(cfg)                      # bad data input fails here, before any model
    executor = make_executor(cfg, data, progress)
    mask, theta0 = executor.mask, executor.theta0
    new_dir = None
    try:
        if resume is None:
            if store is not None:
                store.prepare()
            new_dir = prepare_run_dir(cfg, overwrite)
        writer = open_run_dir(cfg, data, mask, theta0, new_dir, resume)
        if progress:
            sizes = data.client_sizes
            print(f"{cfg.name}: {cfg.model.name} on {cfg.data.task}, {len(sizes)} clients ({cfg.data.partition}, "
                  f"sizes {min(sizes)}-{max(sizes)}, extreme {data.extreme_clients}), mask {cfg.mask.kind} "
                  f"u={cfg.mask.density:g} n={mask.n:,}, R={cfg.fed.rounds} T={cfg.fed.local_steps}", flush=True)
        server = executor.make_server(cfg, theta0, mask.pretrain_grad, data.client_sizes)
        if resume is not None:
            server.load_state(resume.server, resume.theta)
            executor.restore(resume.theta, resume.round)
        end = federate(cfg, server, executor, writer, resume.theta if resume else theta0, progress, on_round,
                       resume, data.extreme_clients, commit=store.commit if store is not None else None)
        check_agreement(end.theta, server.theta_digest(), executor.theta_digests())
    except BaseException:
        if new_dir is not None and not (new_dir / CHECKPOINT_FILE).is_file():
            shutil.rmtree(new_dir, ignore_errors=True)  # a new folder with nothing to resume: leave none
        raise
    finally:
        executor.close()
    run_dir = writer.dir
    save_theta(run_dir / "sparse_final.safetensors", end.theta)
    summary = make_summary(cfg, data, mask.n, end, writer.metrics)
    summary["total_wall_s"] = round(time.perf_counter() - t_start, 2)
    write_json(run_dir / "summary.json", summary)
    if progress:
        print_summary(summary, run_dir)
    return summary


def check_agreement(theta: torch.Tensor, server_digest: str, worker_digests: list[str]) -> None:
    """The driver's global values, the server's and every worker's are one and the same, bit for bit."""
    mine = theta_digest(theta)
    if server_digest != mine:
        raise RuntimeError("the server and the driver disagree on the global values")
    if any(d != mine for d in worker_digests):
        raise RuntimeError("client workers and the driver disagree on the global values")


def make_summary(cfg: Config, data: DataSetup, mask_size: int, end: LoopEnd, metrics: list[dict]) -> dict:
    """summary.json, from the loop's record and the server's final JSON state."""
    last, state, vp = end.last, end.state, end.state["vp"]
    flagged, decided_round = list(vp["flagged"]), vp["decided_round"]
    summary = {
        "name": cfg.name,
        "algorithm": cfg.fed.algorithm,
        "replayable": ALGORITHMS[cfg.fed.algorithm].replayable,  # sparse_final from path.parquet alone
        "zero_shot_accuracy": last["zero_shot_accuracy"],
        "final_accuracy": last["accuracy"],
        "best_accuracy": last["best_accuracy"],
        "final_test_loss": last["test_loss"],
        "num_test": len(data.task.test_labels),
        "uplink_bytes": state["uplink_bytes"],
        "downlink_bytes": state["downlink_bytes"],
        "local_steps": state["local_steps"],
        "rounds": cfg.fed.rounds,
        "mask_size": mask_size,
        "flagged_clients": flagged,
        "vp_decided_round": decided_round,
        "vp_calibration": cfg.vp.calibration if cfg.vp.enabled else None,
        "vp_statistic": cfg.vp.statistic if cfg.vp.enabled else None,
        "calibration_local_steps": sum(m.get("local_steps") or 0 for m in metrics if m.get("calibration")),
        "extreme_clients": data.extreme_clients,
        "flagging": flag_quality(flagged, data.extreme_clients) if decided_round is not None else None,
        "vpcs": {str(k): dict(v) for k, v in vp["stats"].items()},
        "vpcs_left_out": dict(vp.get("left_out") or {}),  # client -> why the decision could not judge it
        "train_wall_s": round(last["train_wall_s"], 2),
    }
    if cfg.privacy.enabled:  # DP-ZO: each client's epsilon at delta for the steps it ran
        from .privacy import noise_multiplier, rates, spent

        epsilons = spent(cfg, data.client_sizes, state["private_steps"])
        summary["privacy"] = {"epsilon": epsilons, "max_epsilon": max(epsilons.values(), default=0.0),
                              "delta": cfg.privacy.delta, "noise_multiplier": noise_multiplier(cfg, data.client_sizes),
                              "clip": cfg.privacy.clip, "sampling_rates": rates(cfg, data.client_sizes),
                              "steps": list(state["private_steps"]), "accountant": "opacus RDP",
                              "sampling": "poisson"}
    return summary


def print_summary(s: dict, run_dir: Path) -> None:
    def row(label, value):
        print(f"  {label:<28} {value}")

    print(f"\nsummary of {run_dir}")
    row("zero-shot accuracy", f"{s['zero_shot_accuracy']:.3f}  (n={s['num_test']})")
    row("final accuracy", f"{s['final_accuracy']:.3f}  (best {s['best_accuracy']:.3f})")
    row("uplink / downlink bytes", f"{s['uplink_bytes']:,} / {s['downlink_bytes']:,}")
    row("local steps", f"{s['local_steps']:,} over {s['rounds']} rounds, mask n={s['mask_size']:,}")
    decided = s["vp_decided_round"]
    row("flagged clients (VPCS)", f"{s['flagged_clients']}  (decided after round {decided}, "
        f"{s['calibration_local_steps']:,} calibration steps)" if decided is not None else "not decided")
    if s["vpcs_left_out"]:
        row("left out of the decision", ", ".join(f"{k} ({why})" for k, why in s["vpcs_left_out"].items()))
    row("truly extreme clients", s["extreme_clients"])
    if s["flagging"]:
        f = s["flagging"]
        row("flagging precision / recall", f"{_fmt(f['precision'])} / {_fmt(f['recall'])}")
    if s.get("privacy"):
        p = s["privacy"]
        bound = ("no (epsilon, delta) bound: noise multiplier 0" if p["max_epsilon"] in (None, float("inf"))
                 else f"epsilon <= {p['max_epsilon']:.3g} per client at delta {p['delta']:g}")
        row("privacy (DP-ZO)", f"{bound} (noise multiplier {p['noise_multiplier']:.3g}, clip {p['clip']:g}, "
                               f"{p['accountant']})")
    row("wall time", f"{s['total_wall_s']:.1f} s")


# ----------------------------------------------------------------------------- stored runs

def run_stored(cfg, overwrite: bool = False, progress: bool = True, on_round=None, resume=None) -> dict:
    """`runner.run_experiment`, with the run folder uploaded to `output_dir` when that is a URI
    (after every checkpoint, before `on_round` sees the round, and at the end; `RunStore`)."""
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
