"""How many local steps a round asks of a client: the one schedule the server, the config checks
and the analysis share (it reads the config tree and imports nothing of the package)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


def round_steps(cfg: Config, round_: int) -> int:
    """Local steps a (not early-stopped) client runs in round `round_` (rounds count from 1)."""
    if round_ == 1:
        if cfg.fed.first_round_steps:
            return cfg.fed.first_round_steps
        if cfg.vp.enabled and cfg.vp.calibration != "rounds":  # at least calib_steps uninterrupted steps
            return max(cfg.vp.calib_steps, cfg.fed.local_steps)
    return cfg.fed.local_steps
