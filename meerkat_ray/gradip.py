"""GradIP and virtual-path client selection (VPCS, the "vp" of Meerkat-vp).

GradIP_k^t = <g_pre, scalar_k^t z_t> = scalar_k^t * <g_pre, z_t>: one scalar per replayed step.

VPCS on each client's calibration trajectory a_t = |GradIP_k^t|, t < calib_steps:
    early  = first `early_fraction` of the steps, late = last `late_fraction`
    S      = the phase statistic, `vp.statistic`: mean or median (|GradIP| is heavy-tailed: single
             steps of 60-100 among values of 1-10, so a mean over a few early steps is one outlier)
    ref    = median over clients of S(late) (vp.reference=late) or of S(early)   (sigma is scale-free;
             measured: in 30 steps from the pre-trained model *every* client's |GradIP| falls as the
             model's label bias is corrected, so the late level of the population is the fair yardstick)
    rho_later_k = S(early_k) / S(late_k)
    quiet_k     = fraction of late steps with a_t < sigma * ref
A client is flagged extreme non-IID when rho_later_k > rho and quiet_k > min_quiet_fraction; it is
then early-stopped (1 local step per round instead of T). Who is stopped is decided by the
`vp.policy` object (`strategies/policies.py`: gradip = these flags, random = as many at random);
this module collects the trajectories and computes the statistics the policies read.

Left out of the decision (judged by no one, never flagged, and named with the reason in the
deciding round's metrics, `vpcs_left_out_clients` / `vpcs_left_out_reasons`): a client with fewer
than `calib_steps` GradIPs by then (its results were refused, or it was not sampled), and a client
whose calibration trajectory holds a non-finite GradIP (one NaN would make the population reference
NaN, so that no step is quiet and VPCS flags no one). The others are decided exactly as if the
left-out clients did not exist; if every trajectory is full but none finite, VPCS decides that it
flags no one.

The decay shows only on an *uninterrupted* local trajectory (each averaging restarts a client from
a global model the others pull back), so by default the calibration is round 1, run for
`calib_steps` steps from the initial model (`vp.calibration`, see `config.round_steps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, VPConfig


@dataclass
class VPCSStats:
    rho_later: float
    quiet_fraction: float
    early: float        # S(early phase) of |GradIP|, S = vp.statistic
    late: float         # S(late phase)


def phase_lengths(steps: int, early_fraction: float, late_fraction: float) -> tuple[int, int]:
    early = max(1, round(early_fraction * steps))
    late = max(1, min(steps - early, round(late_fraction * steps)))
    return early, late


def vpcs_statistics(trajectories: dict[int, np.ndarray], cfg: VPConfig) -> dict[int, VPCSStats]:
    """Per client (rho_later, quiet fraction) from |GradIP| trajectories of equal length."""
    if not trajectories:
        return {}
    absolute = {k: np.abs(np.asarray(v, dtype=np.float64)) for k, v in trajectories.items()}
    steps = min(len(v) for v in absolute.values())
    n_early, n_late = phase_lengths(steps, cfg.early_fraction, cfg.late_fraction)
    summarise = STATISTICS[cfg.statistic]
    early = {k: summarise(v[:n_early]) for k, v in absolute.items()}
    late = {k: summarise(v[steps - n_late: steps]) for k, v in absolute.items()}
    reference = float(np.median(list((late if cfg.reference == "late" else early).values())))
    stats = {}
    for k, v in absolute.items():
        rho_later = early[k] / late[k] if late[k] > 0 else float("inf")
        quiet = float((v[steps - n_late: steps] < cfg.sigma * reference).mean())
        stats[k] = VPCSStats(rho_later, quiet, early[k], late[k])
    return stats


STATISTICS = {"mean": lambda a: float(np.mean(a)), "median": lambda a: float(np.median(a))}


def gradip_flags(stats: dict[int, VPCSStats], cfg: VPConfig) -> list[int]:
    return sorted(k for k, s in stats.items() if s.rho_later > cfg.rho and s.quiet_fraction > cfg.min_quiet_fraction)


class VPState:
    """Collects |GradIP| per client until every client has `calib_steps`, then computes the VPCS
    statistics once; the early-stop policies read them and set `flagged` (the run's stopped set)."""

    def __init__(self, cfg: VPConfig, num_clients: int, seed: int):
        self.cfg = cfg
        self.trajectories: dict[int, list[float]] = {k: [] for k in range(num_clients)}
        self.flagged: list[int] = []
        self.stats: dict[int, VPCSStats] = {}
        self.left_out: dict[int, str] = {}  # client -> why the decision left it out
        self.decided_round: int | None = None
        self.rng = np.random.default_rng([seed, 7])

    @property
    def decided(self) -> bool:
        return self.decided_round is not None

    def record(self, client: int, grad_ips: list[float]) -> None:
        """Keep a client's first `calib_steps` GradIP values while the decision is open: nothing
        more is ever read, and keeping every step (VPCS off, or steps past the window) grew the
        server by K x T values per round for the whole run."""
        trajectory = self.trajectories[client]
        if self.cfg.enabled and not self.decided:
            trajectory.extend(grad_ips[: max(0, self.cfg.calib_steps - len(trajectory))])

    def maybe_decide(self, round_: int, planned_steps: int) -> bool:
        """Decide after the first round by which every client could have run `calib_steps` steps
        (`planned_steps`: the local steps of rounds 1..round_ for a client that was not stopped).

        Clients with a short or non-finite trajectory then are left out (`left_out`, the reason)."""
        if self.decided or not self.cfg.enabled:
            return False
        steps = self.cfg.calib_steps
        if planned_steps < steps:
            return False
        full = {k: np.asarray(v[:steps], dtype=np.float64) for k, v in self.trajectories.items() if len(v) >= steps}
        if not full:
            return False
        left_out = {k: f"{len(v)} of {steps} calibration GradIPs (results refused, or not sampled)"
                    for k, v in self.trajectories.items() if len(v) < steps}
        for k, a in full.items():
            bad = np.flatnonzero(~np.isfinite(a))
            if bad.size:
                left_out[k] = f"non-finite GradIP at calibration step {int(bad[0])}: {a[bad[0]]}"
        self.left_out = dict(sorted(left_out.items()))
        self.stats = vpcs_statistics({k: a for k, a in full.items() if k not in left_out}, self.cfg)
        self.decided_round = round_
        return True

    def state_dict(self) -> dict:
        """JSON-able state for a checkpoint (a decision reads only the first calib_steps of each trajectory)."""
        steps = self.cfg.calib_steps
        return {
            "trajectories": {str(k): [float(v) for v in t[:steps]] for k, t in self.trajectories.items()},
            "flagged": list(self.flagged),
            "stats": {str(k): vars(s) for k, s in self.stats.items()},
            "left_out": {str(k): reason for k, reason in self.left_out.items()},
            "decided_round": self.decided_round,
            "rng": self.rng.bit_generator.state,
        }

    def load_state(self, vp: dict) -> None:
        self.trajectories = {int(k): list(t) for k, t in vp["trajectories"].items()}
        self.flagged = list(vp["flagged"])
        self.stats = {int(k): VPCSStats(**s) for k, s in vp["stats"].items()}
        self.left_out = {int(k): reason for k, reason in vp.get("left_out", {}).items()}  # none in older checkpoints
        self.decided_round = vp["decided_round"]
        self.rng.bit_generator.state = vp["rng"]


def check_calibration(cfg: Config) -> None:
    """Meerkat-vp must be able to decide, and early enough to matter (never a silent no-op)."""
    from .config import round_steps

    vp, fed = cfg.vp, cfg.fed
    if not vp.enabled:
        return
    if vp.calibration == "rounds":
        needed = math.ceil(max(0, vp.calib_steps - round_steps(cfg, 1)) / fed.local_steps) + 1
        if needed > fed.rounds:
            raise ConfigError(f"vp.calib_steps: {vp.calib_steps} calibration steps spread over rounds of "
                              f"{fed.local_steps} need {needed} rounds, the run has fed.rounds={fed.rounds}")
        return
    if fed.first_round_steps and fed.first_round_steps < vp.calib_steps:
        raise ConfigError(f"fed.first_round_steps: {fed.first_round_steps} is shorter than the {vp.calib_steps} "
                          f"calibration steps vp.calibration={vp.calibration} takes in round 1")
    if vp.calibration == "probe" and fed.rounds < 2:
        raise ConfigError("fed.rounds: vp.calibration=probe discards round 1, so the run needs at least 2 rounds")


def flag_quality(flagged: list[int], extreme: list[int]) -> dict:
    """Precision / recall of the flagged set against the truly extreme clients."""
    flagged_set, extreme_set = set(flagged), set(extreme)
    hits = len(flagged_set & extreme_set)
    return {
        "true_positives": hits,
        "false_positives": len(flagged_set - extreme_set),
        "false_negatives": len(extreme_set - flagged_set),
        "precision": hits / len(flagged_set) if flagged_set else None,
        "recall": hits / len(extreme_set) if extreme_set else None,
    }
