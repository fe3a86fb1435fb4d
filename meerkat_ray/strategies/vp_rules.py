"""Meerkat-vp's decision rules (`vp.rule`): from every judged client's calibration trajectory of
|GradIP|, the per-client statistics and the flagged (extreme non-IID) clients.

A rule is a class registered with `@register("name")` that reads its `vp.*` keys from the VPConfig
it is built with. The server, the `gradip` / `random` policies and the analysis build it with `vp_rule(cfg.vp)`.

Every client k is judged on its *window*: its first W_k = min(calib_steps, floor(n_k / B))
calibration steps, the steps that read each of its n_k examples at most once (B = data.batch_size).
A client that cycles its few examples collapses its loss the way a single-label client does, so
the steps past its first pass say nothing about its labels (`gradip.calibration_windows`). The
trajectory a_k^t = |GradIP_k^t|, t < W_k, is what a rule reads; with W_k = calib_steps for every
client (the usual case) each rule is exactly its formula over the whole calibration.

Rules (e_k = max(1, round(early_fraction W_k)), l_k = max(1, min(W_k - e_k, round(late_fraction W_k)))):

- `paper` - the paper's rule: S = vp.statistic (mean | median),
      rho_later_k = S(a_k[:e_k]) / S(a_k[W_k - l_k:]),
      ref = median over clients of S(late) (vp.reference=late) or of S(early),
      quiet_k = fraction of the late steps with a_k^t < sigma * ref;
  flag when rho_later_k > rho and quiet_k > min_quiet_fraction. Thresholds sigma, rho and
  min_quiet_fraction are chosen per setting.

- `stepwise` - clients compared at each step. GradIP_k^t = s_k^t <g_pre, z_t>, and with
  fed.seed_sharing=round every client shares z_t at step t, so the factor <g_pre, z_t> cancels
  in a comparison at the same step:
      x_k^t = log max(a_k^t, 1e-300),   m^t = median of x_j^t over the clients j with W_j > t,
      r_k^t = x_k^t - m^t   (= log|s_k^t| - median_j log|s_j^t|: the client's relative level),
      level_k = median of r_k^t over its late phase (last l_k steps), start_k = over its early phase,
      decay_k = level_k - start_k   (how far the client fell behind the population: a client
                whose own data differ only in scale keeps its place, decay ~ 0),
      se_k = sqrt(pi / 2) sqrt(mad(early r_k)^2 / e_k + mad(late r_k)^2 / l_k)   (its standard error;
             mad = 1.4826 x the median absolute deviation),
      spread = max(mad_j decay_j, median_j se_j)   (never below the noise of one client's decay:
               with few clients the MAD of their decays can be near 0 by chance),
      z_k = (decay_k - median_j decay_j) / spread   (robust z across clients);
  flag when z_k < -outlier_z (3.5: the usual cut-off of the modified z-score, Iglewicz and
  Hoaglin; no flag when the spread is 0).

- `trend` - a Mann-Kendall test of a decreasing trend of each client's relative level r_k^t
  over its whole window (n = W_k): S_k = sum_{i<j} sign(r_k^j - r_k^i), Var = n(n-1)(2n+5)/18,
  Z_k = (S_k - sign(S_k)) / sqrt(Var); flag when Z_k < Phi^-1(trend_alpha / K) (one-sided,
  Bonferroni over the K judged clients) and level_k < 0 (the client ends below the population).

`stepwise` and `trend` compare clients on shared directions, so they need fed.seed_sharing=round
and a calibration in which the clients' t-th steps are the same step (first_round or probe, or
rounds without client sampling).
"""
from __future__ import annotations

from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..gradip import phase_lengths, vpcs_statistics
from ..registry import registrar

if TYPE_CHECKING:
    from ..config import Config, VPConfig

VP_RULES: dict[str, type[VPRule]] = {}
register = registrar(VP_RULES)
TINY = 1e-300  # |GradIP| floor before the log: a collapsed client's exact-zero scalar stays finite


def vp_rule(vp: VPConfig) -> VPRule:
    return VP_RULES[vp.rule](vp)


class VPRule:
    name = ""

    def __init__(self, vp: VPConfig):
        self.vp = vp

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse (ConfigError) a config this rule cannot judge; called for every registered rule."""

    def statistics(self, trajectories: dict[int, np.ndarray]) -> dict[int, dict[str, float]]:
        """Per judged client, the rule's named statistics (JSON-able floats) from its window of |GradIP|."""
        raise NotImplementedError

    def flags(self, stats: dict[int, dict[str, float]]) -> list[int]:
        raise NotImplementedError


@register("paper")
class PaperRule(VPRule):
    """Reads vp.statistic, reference, sigma, rho, min_quiet_fraction and the phase fractions."""

    def statistics(self, trajectories):
        return {k: vars(s) for k, s in vpcs_statistics(trajectories, self.vp).items()}

    def flags(self, stats):
        vp = self.vp
        return sorted(k for k, s in stats.items() if s["rho_later"] > vp.rho and s["quiet_fraction"] > vp.min_quiet_fraction)


def relative_levels(trajectories: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """r_k^t = log a_k^t - median over the clients present at step t of log a_j^t."""
    logs = {k: np.log(np.maximum(np.abs(np.asarray(v, dtype=np.float64)), TINY)) for k, v in trajectories.items()}
    longest = max((len(v) for v in logs.values()), default=0)
    medians = np.array([np.median([v[t] for v in logs.values() if len(v) > t]) for t in range(longest)])
    return {k: v - medians[: len(v)] for k, v in logs.items()}


def late_phases(relative: dict[int, np.ndarray], vp: VPConfig) -> dict[int, np.ndarray]:
    out = {}
    for k, r in relative.items():
        _, n_late = phase_lengths(len(r), vp.early_fraction, vp.late_fraction)
        out[k] = r[len(r) - n_late:]
    return out


def mad(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation (the standard deviation of a normal sample)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values)))) if len(values) else 0.0


class SharedStepsRule(VPRule):
    @classmethod
    def check(cls, cfg):
        if cfg.vp.rule != cls.name or not cfg.vp.enabled:
            return
        if cfg.fed.seed_sharing != "round":
            raise ConfigError(f"vp.rule: {cls.name} compares the clients at each shared step direction, so it needs "
                              f"fed.seed_sharing=round (got {cfg.fed.seed_sharing})")
        if cfg.zo.num_perturbations > 1:
            raise ConfigError(f"vp.rule: {cls.name} divides out the step's shared <g_pre, z_t>, which a step of "
                              "zo.num_perturbations > 1 directions does not have (use vp.rule=paper)")
        if cfg.vp.calibration == "rounds" and cfg.fed.clients_per_round > 0:
            raise ConfigError(f"vp.rule: {cls.name} compares the clients' t-th calibration steps, which "
                              "vp.calibration=rounds with fed.clients_per_round takes in different rounds")


@register("stepwise")
class StepwiseRule(SharedStepsRule):
    """Reads vp.outlier_z and the phase fractions."""

    def statistics(self, trajectories):
        relative = relative_levels(trajectories)
        if not relative:
            return {}
        rows = {}
        for k, r in relative.items():
            n_early, n_late = phase_lengths(len(r), self.vp.early_fraction, self.vp.late_fraction)
            early, late = r[:n_early], r[len(r) - n_late:]
            rows[k] = {"level": float(np.median(late)), "decay": float(np.median(late) - np.median(early)),
                       "se": float(np.sqrt(np.pi / 2)) * float(np.sqrt(mad(early) ** 2 / n_early + mad(late) ** 2 / n_late))}
        decays = np.array([row["decay"] for row in rows.values()])
        centre = float(np.median(decays))
        spread = max(mad(decays), float(np.median([row["se"] for row in rows.values()])))
        for row in rows.values():
            row["z"] = (row["decay"] - centre) / spread if spread > 0 else 0.0
            row["spread"] = spread
        return rows

    def flags(self, stats):
        return sorted(k for k, s in stats.items() if s["z"] < -self.vp.outlier_z)


def mann_kendall_z(values: np.ndarray) -> float:
    """Mann-Kendall trend statistic (normal approximation, continuity-corrected, no tie correction)."""
    n = len(values)
    if n < 2:
        return 0.0
    diff = np.sign(values[None, :] - values[:, None])
    s = float(np.triu(diff, k=1).sum())
    var = n * (n - 1) * (2 * n + 5) / 18.0
    return (s - np.sign(s)) / np.sqrt(var)


@register("trend")
class TrendRule(SharedStepsRule):
    """Reads vp.trend_alpha and the phase fractions (its level is the late phase's)."""

    def statistics(self, trajectories):
        relative = relative_levels(trajectories)
        levels = {k: float(np.median(r)) for k, r in late_phases(relative, self.vp).items()}
        z_crit = NormalDist().inv_cdf(self.vp.trend_alpha / max(1, len(relative)))
        return {k: {"level": levels[k], "trend_z": float(mann_kendall_z(r)), "z_crit": z_crit}
                for k, r in relative.items()}

    def flags(self, stats):
        return sorted(k for k, s in stats.items() if s["trend_z"] < s["z_crit"] and s["level"] < 0)

