"""Client algorithms: what a client computes in its local steps and how the server turns the
results into the next global masked values. `fed.algorithm` picks one; `ALGORITHMS` is its list
of choices (config validation reads it). Each module states its bytes per round and its memory.
"""
from . import sparse_zo  # noqa: F401  (registration; the default first)
from . import first_order  # noqa: F401
from . import lora_zo  # noqa: F401
from .base import ALGORITHMS, Algorithm, LocalOutcome, make_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "LocalOutcome", "make_algorithm"]
