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
The paper's rule (`vp.rule=paper`) flags a client extreme non-IID when rho_later_k > rho and
quiet_k > min_quiet_fraction; the other rules are in `strategies/vp_rules.py`. A flagged client is
then early-stopped (1 local step per round instead of T). Who is stopped is decided by the
`vp.policy` object (`strategies/policies.py`: gradip = the rule's flags, random = as many at random);
this module computes the statistics and each client's calibration window.

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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    from .config import VPConfig


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


def calibration_windows(sizes: list[int], batch_size: int, calib_steps: int) -> list[int]:
    """Per client, the calibration steps VPCS judges it on: W_k = min(calib_steps, floor(n_k / B)),
    the steps that read each of its n_k examples at most once (a client cycling a few examples
    collapses its loss like a single-label one)."""
    return [min(calib_steps, int(n) // batch_size) for n in sizes]


def min_window(cfg: VPConfig) -> int:
    """The fewest window steps a judged client has: vp.min_window, at most the calibration itself."""
    return min(cfg.min_window, cfg.calib_steps)


def vpcs_statistics(trajectories: dict[int, np.ndarray], cfg: VPConfig) -> dict[int, VPCSStats]:
    """Per client (rho_later, quiet fraction) from its |GradIP| trajectory (its window: phases are
    measured on each client's own length, the same for all in the usual case)."""
    if not trajectories:
        return {}
    absolute = {k: np.abs(np.asarray(v, dtype=np.float64)) for k, v in trajectories.items()}
    summarise = STATISTICS[cfg.statistic]
    lengths = {k: phase_lengths(len(v), cfg.early_fraction, cfg.late_fraction) for k, v in absolute.items()}
    early = {k: summarise(v[:lengths[k][0]]) for k, v in absolute.items()}
    late = {k: summarise(v[len(v) - lengths[k][1]:]) for k, v in absolute.items()}
    reference = float(np.median(list((late if cfg.reference == "late" else early).values())))
    stats = {}
    for k, v in absolute.items():
        rho_later = early[k] / late[k] if late[k] > 0 else float("inf")
        quiet = float((v[len(v) - lengths[k][1]:] < cfg.sigma * reference).mean())
        stats[k] = VPCSStats(rho_later, quiet, early[k], late[k])
    return stats


STATISTICS = {"mean": lambda a: float(np.mean(a)), "median": lambda a: float(np.median(a))}


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
