"""Partitions of a train set among federated clients."""

import numpy as np
import pytest

from meerkat_ray.errors import ConfigError
from meerkat_ray.partition import PARTITIONS, Partition, make_partition

NUM_CLASSES = 4
# 1,000 examples with unequal classes (400 / 300 / 200 / 100), in a shuffled order
LABELS = np.random.default_rng(123).permutation(
    np.repeat(np.arange(NUM_CLASSES), [400, 300, 200, 100]))


def partition(kind, k=10, *, alpha=0.5, frac=0.3, seed=0, labels=LABELS) -> Partition:
    return make_partition(labels, k, kind, alpha=alpha, extreme_fraction=frac, seed=seed,
                          num_classes=NUM_CLASSES)


def check_valid(part: Partition, k: int, n: int = len(LABELS)) -> np.ndarray:
    """Every client non-empty, sorted int64; no example used twice; returns the used indices."""
    assert len(part.client_indices) == len(part.extreme) == k
    assert all(len(idx) > 0 for idx in part.client_indices)
    for idx in part.client_indices:
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    used = np.concatenate(part.client_indices)
    assert len(np.unique(used)) == len(used) and used.min() >= 0 and used.max() < n
    assert sum(part.sizes()) == len(used)
    return used


def single_label(part: Partition, client: int) -> bool:
    return len(np.unique(LABELS[part.client_indices[client]])) == 1


@pytest.mark.parametrize("kind", list(PARTITIONS))
@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_every_kind_is_valid(kind, k):
    part = partition(kind, k)
    used = check_valid(part, k)
    hist = part.histograms(LABELS, NUM_CLASSES)
    assert [sum(h) for h in hist] == part.sizes()
    if kind in ("iid", "dirichlet"):  # these use every example
        assert np.array_equal(np.sort(used), np.arange(len(LABELS)))
        assert not any(part.extreme)


def test_iid_sizes_near_equal():
    assert set(partition("iid", 7).sizes()) == {142, 143}  # 1000 = 6 * 143 + 142


def test_extreme_clients_hold_one_label_each():
    part = partition("extreme", 10)
    assert all(part.extreme) and all(single_label(part, c) for c in range(10))
    labels = [int(LABELS[idx[0]]) for idx in part.client_indices]
    assert sorted(np.bincount(labels).tolist()) == [2, 2, 3, 3]  # round-robin over 4 classes
    # each class's examples are split evenly among its clients, and all are used
    assert np.array_equal(np.sort(np.concatenate(part.client_indices)), np.arange(len(LABELS)))
    for c in range(NUM_CLASSES):
        sizes = [len(idx) for idx, lab in zip(part.client_indices, labels) if lab == c]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("k, frac", [(10, 0.3), (10, 0.5), (7, 0.25), (4, 0.0), (5, 1.0)])
def test_mixed_has_round_frac_k_single_label_clients(k, frac):
    part = partition("mixed", k, frac=frac)
    check_valid(part, k)
    assert sum(part.extreme) == round(frac * k)
    for client, flag in enumerate(part.extreme):
        if flag:
            assert single_label(part, client)
            if frac < 1:  # about N/K examples each
                assert len(part.client_indices[client]) <= len(LABELS) // k


def mean_max_class_share(part: Partition) -> float:
    hist = np.array(part.histograms(LABELS, NUM_CLASSES), dtype=float)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def test_dirichlet_alpha_controls_skew():
    # With alpha = 100 each client's class mix is close to the global one, whose largest class is
    # 40%: the mean max-class share stays near 0.4 (below 0.5). With alpha = 0.1 the proportions
    # Dir(0.1 * 1_K) put almost all of a class on one or two clients, so most clients are dominated
    # by one class: a share of ~0.8-0.9 is typical, and 0.7 leaves a wide margin over 0.5.
    for seed in range(3):
        flat = mean_max_class_share(partition("dirichlet", 10, alpha=100.0, seed=seed))
        skewed = mean_max_class_share(partition("dirichlet", 10, alpha=0.1, seed=seed))
        assert flat < 0.5 < 0.7 < skewed


def test_dirichlet_tiny_alpha_still_fills_every_client():
    check_valid(partition("dirichlet", 50, alpha=0.01), 50)


@pytest.mark.parametrize("kind", list(PARTITIONS))
def test_seeded(kind):
    a, b, c = partition(kind, seed=5), partition(kind, seed=5), partition(kind, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    assert a.extreme == b.extreme
    assert any(not np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))


def test_bad_inputs():
    with pytest.raises(ConfigError, match=r"^data\.partition: unknown partition 'zipf'"):
        partition("zipf")
    with pytest.raises(ConfigError, match=r"^data\.num_clients"):
        partition("iid", 1001)
    with pytest.raises(ConfigError, match=r"^data\.num_clients"):
        partition("iid", 0)
    with pytest.raises(ConfigError, match=r"^data\.alpha"):
        partition("dirichlet", alpha=0.0)
    with pytest.raises(ConfigError, match=r"^data\.extreme_fraction"):
        partition("mixed", frac=1.5)
    # a single-label client of the rare class (1 example) cannot be given to two clients
    tiny = np.array([0] * 10 + [1])
    with pytest.raises(ConfigError, match=r"^data\.num_clients"):
        make_partition(tiny, 4, "extreme", alpha=0.5, extreme_fraction=1.0, seed=0, num_classes=2)
