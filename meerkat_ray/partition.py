"""Split a train set among K federated clients: iid, dirichlet, extreme and mixed partitions.

All partitions are seeded (`numpy.random.default_rng(seed)`), use every example at most once and
give every client at least one example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from meerkat_ray.errors import ConfigError

DIRICHLET_TRIES = 100  # resamples before empty Dirichlet clients are topped up by hand


@dataclass
class Partition:
    """Per-client example indices (sorted int64) and which clients are single-label."""

    client_indices: list[np.ndarray]
    extreme: list[bool]

    def sizes(self) -> list[int]:
        return [len(idx) for idx in self.client_indices]

    def histograms(self, labels, num_classes: int) -> list[list[int]]:
        """Per-client label counts."""
        labels = np.asarray(labels, dtype=np.int64)
        return [np.bincount(labels[idx], minlength=num_classes).tolist()
                for idx in self.client_indices]


Parts = list[np.ndarray]


def _iid(labels, k, rng, *, alpha, extreme_fraction, num_classes) -> tuple[Parts, list[bool]]:
    """Shuffle and cut into k near-equal parts."""
    return np.array_split(rng.permutation(len(labels)), k), [False] * k


def _dirichlet_split(labels: np.ndarray, pool: np.ndarray, k: int, alpha: float,
                     num_classes: int, rng: np.random.Generator) -> Parts:
    """Hsu et al. (2019): per class, proportions over the k clients ~ Dir(alpha * 1_k)."""
    if alpha <= 0:
        raise ConfigError(f"data.alpha: must be > 0, got {alpha}")
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in range(num_classes):
            members = rng.permutation(pool[labels[pool] == c])
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts[:-1])):
                parts[client].append(chunk)
        result = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        if all(len(p) for p in result):
            return result
    # Still some empty clients (tiny alpha or few examples): move one example at a time from
    # the largest client to each empty one, so every client ends up with at least one.
    for client in range(k):
        if len(result[client]) == 0:
            donor = int(np.argmax([len(p) for p in result]))
            result[client], result[donor] = result[donor][-1:], result[donor][:-1]
    return result


def _dirichlet(labels, k, rng, *, alpha, extreme_fraction, num_classes):
    pool = np.arange(len(labels))
    return _dirichlet_split(labels, pool, k, alpha, num_classes, rng), [False] * k


def _single_label(labels: np.ndarray, k: int, rng: np.random.Generator,
                  num_classes: int, share: int | None) -> Parts:
    """k single-label clients: labels dealt round-robin over a shuffled class order; each
    class's examples split evenly among its clients (or `share` examples each, at most)."""
    present = np.flatnonzero(np.bincount(labels, minlength=num_classes))
    order = rng.permutation(present)
    client_label = [int(order[i % len(order)]) for i in range(k)]
    parts: Parts = [np.empty(0, np.int64)] * k
    for c in set(client_label):
        clients = [i for i, lab in enumerate(client_label) if lab == c]
        members = rng.permutation(np.flatnonzero(labels == c))
        if share is not None:
            members = members[:min(len(members), share * len(clients))]
        for client, chunk in zip(clients, np.array_split(members, len(clients))):
            parts[client] = chunk
    return parts


def _extreme(labels, k, rng, *, alpha, extreme_fraction, num_classes):
    return _single_label(labels, k, rng, num_classes, share=None), [True] * k


def _mixed(labels, k, rng, *, alpha, extreme_fraction, num_classes):
    """round(extreme_fraction * k) random single-label clients of ~N/k examples each; the
    remaining examples go to the other clients by Dirichlet(alpha)."""
    num_extreme = round(extreme_fraction * k)
    if num_extreme == k:
        return _extreme(labels, k, rng, alpha=alpha, extreme_fraction=extreme_fraction,
                        num_classes=num_classes)
    flags = np.zeros(k, dtype=bool)
    flags[rng.choice(k, size=num_extreme, replace=False)] = True
    ext_ids, other_ids = np.flatnonzero(flags), np.flatnonzero(~flags)
    parts: Parts = [np.empty(0, np.int64)] * k
    if num_extreme:
        singles = _single_label(labels, num_extreme, rng, num_classes, len(labels) // k)
        for client, chunk in zip(ext_ids, singles):
            parts[client] = chunk
    taken = np.concatenate(parts)
    pool = np.setdiff1d(np.arange(len(labels)), taken)
    if len(pool) < len(other_ids):
        raise ConfigError(f"data.num_clients: {k} clients leave {len(pool)} example(s) for "
                          f"{len(other_ids)} non-extreme clients")
    for client, chunk in zip(other_ids, _dirichlet_split(labels, pool, len(other_ids), alpha,
                                                         num_classes, rng)):
        parts[client] = chunk
    return parts, flags.tolist()


PARTITIONS: dict[str, Callable] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "extreme": _extreme,
    "mixed": _mixed,
}


def make_partition(labels, num_clients: int, kind: str, *, alpha: float,
                   extreme_fraction: float, seed: int, num_classes: int) -> Partition:
    """Split examples with `labels` (ids in [0, num_classes)) among `num_clients` clients."""
    split = PARTITIONS.get(kind)
    if split is None:
        raise ConfigError(f"data.partition: unknown partition '{kind}' "
                          f"(choose from: {', '.join(PARTITIONS)})")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if num_clients < 1:
        raise ConfigError(f"data.num_clients: must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ConfigError(f"data.num_clients: {num_clients} clients but only {len(labels)} "
                          "train examples; every client needs at least one")
    if not 0.0 <= extreme_fraction <= 1.0:
        raise ConfigError(f"data.extreme_fraction: must lie in [0, 1], got {extreme_fraction}")
    parts, extreme = split(labels, num_clients, np.random.default_rng(seed), alpha=alpha,
                           extreme_fraction=extreme_fraction, num_classes=num_classes)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"data.num_clients: {num_clients} clients are too many for a "
                          f"'{kind}' partition of this data ({len(empty)} would get no example)")
    return Partition([np.sort(p).astype(np.int64) for p in parts], [bool(e) for e in extreme])
