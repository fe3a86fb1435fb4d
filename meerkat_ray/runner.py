"""One federated experiment: set-up, the round loop, the run folder, the summary.

The round loop is written once (`federate`); where clients and server run is an *executor*:
`LocalExecutor` runs the clients one after another in this process and the server is a local
object (ray.backend=local); `federation.RayExecutor` spreads the clients over client actors and
hosts the server in a server actor, reached through a proxy with the same methods. Per round:
    plans = server.plan_round(r) -> results = executor.run_clients(plans)
    -> server.finish_round (checks, replay, GradIP, VPCS, aggregation, bytes) -> executor.sync(terms)
    -> evaluation every `fed.eval_every` rounds -> metrics.jsonl / path.parquet.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .checkpoint import CHECKPOINT_FILE, RunCheckpoint
from .client import ClientWorker, WorkerHost
from .config import Config, to_dict
from .errors import MeerkatError
from .experiment import DataSetup, build_worker, check_model, prepare_data, prepare_model, test_batches
from .gradip import flag_quality
from .mask import save_mask
from .models import cache_root
from .runlog import RunWriter, load_theta, remove_owned_folder, save_theta, write_json
from .server import Server


# per round in metrics.jsonl: clients re-run, client actors replaced, client actors lost from the pool,
# replacements that joined it, server actors restored from the last checkpoint (all 0 without Ray)
FAULT_COUNTERS = ("retries", "actor_restarts", "pool_shrinks", "pool_regrowths", "server_restarts")


class LocalExecutor(WorkerHost):
    """Runs every virtual client on one in-process worker, sequentially."""

    def __init__(self, worker: ClientWorker, eval_batches):
        self.worker, self.eval_batches = worker, eval_batches

    def make_server(self, cfg: Config, theta: torch.Tensor, g_pre, client_sizes: list[int]) -> Server:
        return Server(cfg, theta, g_pre, client_sizes)

    def local_server(self, server: Server) -> Server:
        return server

    def run_clients(self, plans, on_result=None):
        results = []
        for plan in plans:
            results.append(self.worker.run(plan))
            if on_result:
                on_result(results[-1])
        return results

    def fault_counts(self) -> dict:
        return dict.fromkeys(FAULT_COUNTERS, 0)  # nothing here can die without the whole process

    def close(self) -> None:
        pass


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


def federate(cfg: Config, server: Server, executor, writer: RunWriter, progress: bool = True,
             on_round=None, resume: RunCheckpoint | None = None, extreme_clients: list[int] | None = None) -> dict:
    """The round loop. Returns the last evaluation (accuracy, loss) and timing.

    `on_round(round, metrics, last, checkpoint)` runs after each round's files and its RunCheckpoint
    are written (Tune reports that checkpoint); `resume` continues after the checkpoint's round. After
    the zero-shot evaluation and after every round the run folder's checkpoint is replaced (atomically).
    `extreme_clients` (when the partition knows them) scores the VPCS decision in the round it is made.
    """
    cfg_dict = to_dict(cfg)

    def checkpoint(round_: int) -> RunCheckpoint:
        state, theta = server.state_dict()
        saved = RunCheckpoint(round_, dict(last), state, theta, cfg_dict)
        saved.save(writer.dir)
        return saved

    if resume is None:
        acc0, loss0 = executor.evaluate()
        writer.add_round({"round": 0, "train_loss": None, "accuracy": acc0, "test_loss": loss0, "uplink_bytes": 0,
                          "downlink_bytes": 0, "flagged_clients": [], "wall_s": 0.0}, None)
        if progress:
            print(f"round 0 (zero-shot): accuracy {acc0:.3f}  test loss {loss0:.4f}", flush=True)
        last = {"accuracy": acc0, "test_loss": loss0, "zero_shot_accuracy": acc0, "best_accuracy": acc0}
        checkpoint(0)
    else:
        last = dict(resume.last)
    start = time.perf_counter()
    for r in range((resume.round if resume else 0) + 1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        plans = server.plan_round(r)
        bar = tqdm(total=sum(p.steps for p in plans), desc=f"round {r}/{cfg.fed.rounds}", unit="step",
                   disable=not progress, leave=True, dynamic_ncols=True)
        results = executor.run_clients(plans, on_result=lambda res: bar.update(len(res.losses)))
        outcome = server.finish_round(r, plans, results)
        executor.sync(outcome.sync)
        metrics = dict(outcome.metrics)
        if metrics.get("vp_decided"):
            if extreme_clients is not None:
                metrics["flagging"] = flag_quality(metrics["flagged_clients"], extreme_clients)
            if progress:
                tqdm.write(decision_line(r, metrics, extreme_clients))
        if r % cfg.fed.eval_every == 0 or r == cfg.fed.rounds:
            acc, loss = executor.evaluate()
            metrics.update(accuracy=acc, test_loss=loss)
            last.update(accuracy=acc, test_loss=loss, best_accuracy=max(last["best_accuracy"], acc))
        metrics["compute_s"] = round(sum(res.compute_s for res in results if res is not None), 3)
        metrics.update(executor.fault_counts())  # client actors lost and clients re-run this round
        metrics["wall_s"] = round(time.perf_counter() - t0, 3)
        writer.add_round(metrics, outcome.path_rows)
        saved = checkpoint(r)
        bar.set_postfix(loss=_fmt(metrics.get("train_loss")), acc=_fmt(metrics.get("accuracy")),
                        flagged=len(metrics["flagged_clients"]))
        bar.close()
        if on_round:
            on_round(r, metrics, last, saved)
    last["train_wall_s"] = time.perf_counter() - start
    return last


def decision_line(round_: int, metrics: dict, extreme_clients: list[int] | None) -> str:
    stats = metrics.get("vpcs") or {}
    rho = " ".join(f"{k}:{s['rho_later']:.2f}/{s['quiet_fraction']:.2f}" for k, s in stats.items())
    line = f"VPCS decided after round {round_}: flagged {metrics['flagged_clients']}"
    if extreme_clients is not None:
        f = metrics["flagging"]
        line += f" (truly extreme {extreme_clients}: precision {_fmt(f['precision'])}, recall {_fmt(f['recall'])})"
    return line + f"\n  per client rho_later/quiet: {rho}"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def make_executor(cfg: Config, data: DataSetup, progress: bool):
    """Model, mask and theta_0 for the server, plus the executor that runs the clients."""
    if cfg.ray.backend == "ray":  # the model is loaded by the client actors only, the mask made by actor 0
        from .federation import RayExecutor, connect, disconnect, federation_demand  # Ray stays out of the pure core

        check_model(cfg)
        connect(cfg.ray, *federation_demand(cfg), progress=progress)
        try:
            executor = RayExecutor(cfg, data)
        except BaseException:
            disconnect()
            raise
        return executor.mask, executor.theta0, executor
    lm, mask, theta = prepare_model(cfg, progress=progress)
    worker = build_worker(cfg, data, lm, mask, theta)
    return mask, theta, LocalExecutor(worker, test_batches(lm.tokenizer, data.task, cfg))


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
                   resume: RunCheckpoint | None = None) -> dict:
    """Run one federated experiment end to end and write its run folder. Returns summary.json.

    `on_round` is handed to `federate`; `resume` continues an interrupted run from a checkpoint.
    A new run folder that fails before its first checkpoint is removed again (nothing to resume).
    """
    t_start = time.perf_counter()
    if resume is None and cfg.run_dir.exists() and not overwrite:
        raise MeerkatError(f"{cfg.run_dir}: {EXISTS}")
    check_writable_dir(Path(cfg.output_dir), "output_dir")
    check_writable_dir(cache_root(cfg.model), "model.cache_dir")
    data = prepare_data(cfg)                      # bad data input fails here, before any model
    mask, theta0, executor = make_executor(cfg, data, progress)
    new_dir = None
    try:
        if resume is None:
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
        last = federate(cfg, server, executor, writer, progress, on_round, resume, data.extreme_clients)
        server = executor.local_server(server)  # the final state, in this process
        if not torch.equal(executor.global_theta(), server.theta):
            raise RuntimeError("client workers and server disagree on the global values")
    except BaseException:
        if new_dir is not None and not (new_dir / CHECKPOINT_FILE).is_file():
            shutil.rmtree(new_dir, ignore_errors=True)  # a new folder with nothing to resume: leave none
        raise
    finally:
        executor.close()
    run_dir = writer.dir
    save_theta(run_dir / "sparse_final.safetensors", server.theta)
    summary = {
        "name": cfg.name,
        "algorithm": cfg.fed.algorithm,
        "replayable": ALGORITHMS[cfg.fed.algorithm].replayable,  # sparse_final from path.parquet alone
        "zero_shot_accuracy": last["zero_shot_accuracy"],
        "final_accuracy": last["accuracy"],
        "best_accuracy": last["best_accuracy"],
        "final_test_loss": last["test_loss"],
        "num_test": len(data.task.test_labels),
        "uplink_bytes": server.uplink_bytes,
        "downlink_bytes": server.downlink_bytes,
        "local_steps": server.local_steps,
        "rounds": cfg.fed.rounds,
        "mask_size": mask.n,
        "flagged_clients": server.vp.flagged,
        "vp_decided_round": server.vp.decided_round,
        "vp_calibration": cfg.vp.calibration if cfg.vp.enabled else None,
        "vp_statistic": cfg.vp.statistic if cfg.vp.enabled else None,
        "calibration_local_steps": sum(m.get("local_steps") or 0 for m in writer.metrics if m.get("calibration")),
        "extreme_clients": data.extreme_clients,
        "flagging": flag_quality(server.vp.flagged, data.extreme_clients) if server.vp.decided else None,
        "vpcs": {str(k): vars(s) for k, s in server.vp.stats.items()},
        "train_wall_s": round(last["train_wall_s"], 2),
        "total_wall_s": round(time.perf_counter() - t_start, 2),
    }
    write_json(run_dir / "summary.json", summary)
    if progress:
        print_summary(summary, run_dir)
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
    row("truly extreme clients", s["extreme_clients"])
    if s["flagging"]:
        f = s["flagging"]
        row("flagging precision / recall", f"{_fmt(f['precision'])} / {_fmt(f['recall'])}")
    row("wall time", f"{s['total_wall_s']:.1f} s")


def export_model(run_dir: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face model folder with sparse_final applied to the masked coordinates (lora_zo:
    to the adapters, then merged into the base weights)."""
    from .algorithms import make_algorithm
    from .config import from_dict
    from .experiment import load_run_model
    from .mask import check_mask, load_mask
    from .runlog import load_theta
    from .zo import MaskedView

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for name in ("config.yaml", "mask.safetensors", "sparse_final.safetensors"):
        if not (run_dir / name).is_file():
            raise MeerkatError(f"{run_dir / name}: missing (is {run_dir} a finished run folder?)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MeerkatError(f"{out_dir}: exists and is not empty")
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    lm = load_run_model(cfg)
    mask = load_mask(run_dir / "mask.safetensors")
    check_mask(mask, lm.model, run_dir / "mask.safetensors")
    theta = load_theta(run_dir / "sparse_final.safetensors")
    if theta.numel() != mask.n:
        raise MeerkatError(f"{run_dir / 'sparse_final.safetensors'}: {theta.numel()} values for a mask of {mask.n}")
    MaskedView(lm.model, mask).write_(theta)
    model = make_algorithm(cfg.fed.algorithm).export_model(lm.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(out_dir)
    return out_dir
