"""`python tests/killpoints.py JOBS.json`: run `meerkat-ray` once per job and SIGKILL it at a named
point of a round (tests/test_reliability.py resumes what each kill leaves).

JOBS.json is a list of {"point", "round", "marker", "argv"}. This process imports everything once,
then forks one child per job (two at a time); each child installs its kill point and runs the CLI's
`main(argv)`, so no job pays for a fresh interpreter. The exit status of each child (-9 when it was
killed) is written to JOBS.json's sibling `JOBS.status.json`.

Just before the kill the point writes MARKER (what it saw), so a test can tell a kill at the named
point from a crash anywhere else. Points:

    atomic-path        path.parquet of ROUND written to its temp file, not yet renamed over the old one
    atomic-checkpoint  checkpoint.safetensors of ROUND written to its temp file, not yet renamed
    after-metrics      ROUND's metrics.jsonl line and path rows written, its checkpoint not
    after-checkpoint   ROUND's checkpoint written, the next round not begun
    mid-round          in ROUND, client 0 done, client 1 in the middle of its local steps
    evaluation         in ROUND's evaluation of the global model (ROUND 0: the zero-shot one)
    calibration        in ROUND (the Meerkat-vp calibration round), client 1 in the middle of its steps
    decision           VPCS has just decided in ROUND (in memory), nothing of ROUND written yet
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

POINTS = ("atomic-path", "atomic-checkpoint", "after-metrics", "after-checkpoint", "mid-round", "evaluation",
          "calibration", "decision")


def install(point: str, round_: int, marker: Path) -> None:
    from meerkat_ray import checkpoint, client, runlog
    from meerkat_ray.strategies import strategy

    def die(seen: str) -> None:
        marker.write_text(f"{point} {seen}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("atomic-path", "atomic-checkpoint"):
        name = "path.parquet" if point == "atomic-path" else "checkpoint.safetensors"
        module = runlog if point == "atomic-path" else checkpoint
        real_atomic = module.atomic_path
        writes = []  # one write of each file per round, round 0 included

        @contextlib.contextmanager
        def atomic_path(path):
            with real_atomic(path) as tmp:
                yield tmp
                if Path(path).name == name:
                    writes.append(path)
                    if len(writes) == round_ + 1:  # the temp file is complete; the rename has not happened
                        die(f"{name} round {round_} temp {Path(tmp).name} exists={Path(tmp).is_file()}")

        module.atomic_path = atomic_path
    elif point in ("after-metrics", "after-checkpoint"):
        real_save = checkpoint.RunCheckpoint.save

        def save(self, folder):
            if self.round == round_ and point == "after-metrics":
                die(f"round {self.round} before its checkpoint")
            real_save(self, folder)
            if self.round == round_ and point == "after-checkpoint":
                die(f"round {self.round} after its checkpoint")

        checkpoint.RunCheckpoint.save = save
    elif point in ("mid-round", "calibration"):
        real_batch = client.ClientData.batch  # every local step of every algorithm reads one batch
        steps = []

        def batch(self, *args, **kwargs):
            plan = current[0]
            if plan is not None and plan.round == round_ and plan.client == 1:
                steps.append(1)
                if len(steps) == 2:  # one step of client 1 done, the second under way
                    die(f"round {plan.round} client {plan.client} step 1 of {plan.steps}")
            return real_batch(self, *args, **kwargs)

        current = [None]
        real_run = client.ClientWorker.run

        def run(self, plan):
            current[0] = plan
            return real_run(self, plan)

        client.ClientData.batch = batch
        client.ClientWorker.run = run
    elif point == "evaluation":
        real_scores = client.ClientWorker.batch_scores
        calls = []

        def batch_scores(self, batches):
            calls.append(1)
            if len(calls) == evaluation_index(round_):
                die(f"evaluation {len(calls)} (round {round_})")
            return real_scores(self, batches)

        client.ClientWorker.batch_scores = batch_scores
    elif point == "decision":
        real_decide = strategy.VPState.maybe_decide

        def maybe_decide(self, r, *args, **kwargs):
            decided = real_decide(self, r, *args, **kwargs)
            if decided and r == round_:
                die(f"round {r} decided, flagged {self.flagged}")
            return decided

        strategy.VPState.maybe_decide = maybe_decide
    else:
        raise SystemExit(f"unknown kill point {point!r} (one of {', '.join(POINTS)})")


EVAL_EVERY = int(os.environ.get("KILLPOINT_EVAL_EVERY", "1"))  # the runs' fed.eval_every


def evaluation_index(round_: int) -> int:
    """Which call of the evaluation is round `round_`'s (round 0 first, then every EVAL_EVERY)."""
    return 1 + round_ // EVAL_EVERY


def run_jobs(jobs: list[dict], parallel: int = 2) -> dict[str, int]:
    """Fork a child per job; returns marker -> exit status (negative: the signal that ended it)."""
    import meerkat_ray.cli  # noqa: F401  (the imports every child would repeat)
    import meerkat_ray.runner  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    status, running, pending = {}, {}, list(jobs)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            pid = os.fork()
            if pid == 0:  # the child: never returns into this loop
                code = 1
                try:
                    install(job["point"], int(job["round"]), Path(job["marker"]))
                    from meerkat_ray.cli import main

                    code = main(job["argv"])
                finally:
                    os._exit(code)
            running[pid] = job["marker"]
        pid, wait_status = os.wait()
        marker = running.pop(pid)
        status[marker] = -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)
    return status


if __name__ == "__main__":
    import json

    jobs_file = Path(sys.argv[1])
    result = run_jobs(json.loads(jobs_file.read_text()))
    jobs_file.with_suffix(".status.json").write_text(json.dumps(result))
