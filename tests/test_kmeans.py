"""keras_colopt.kmeans: the exact 1-D k-means against brute force and scikit-learn, and the
Keras 3 engine's centroids built on it."""

import itertools

import numpy as np
import pytest

from keras_colopt import kmeans
from keras_colopt.kmeans import kmeans_1d, sse


def _brute_force(values, k):
    """The least SSE over every partition of the sorted values into k contiguous runs."""
    u = np.sort(np.asarray(values, np.float64))
    best = np.inf
    for cuts in itertools.combinations(range(1, u.size), k - 1):
        bounds = (0, *cuts, u.size)
        best = min(best, sum(((u[a:b] - u[a:b].mean()) ** 2).sum()
                             for a, b in zip(bounds, bounds[1:])))
    return best


def _rows(seed, n):
    """Rows of different distributions, some with many repeated values."""
    rng = np.random.default_rng(seed)
    return {
        "normal": rng.normal(0, 0.05, n),
        "uniform": rng.uniform(-1, 1, n),
        "laplace": rng.laplace(0, 0.02, n),
        "bimodal": np.concatenate([rng.normal(-0.3, 0.02, n // 3),
                                   rng.normal(0.1, 0.05, n - n // 3)]),
        "repeated": np.round(rng.normal(0, 1, n), 1),
    }


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force_on_tiny_inputs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        n, k = int(rng.integers(1, 10)), int(rng.integers(1, 6))
        v = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # ties, often
        c = kmeans_1d(v, k)
        assert c.shape == (k,) and np.all(np.diff(c) >= 0)
        best = _brute_force(v, min(k, len(np.unique(v))))
        np.testing.assert_allclose(sse(v, c), best, rtol=1e-9, atol=1e-12)


def _plain_dp(values, k):
    """The least SSE by the plain O(k n^2) dynamic programme (no pruning of candidates)."""
    u = np.sort(np.asarray(values, np.float64))
    u = u - u.mean()
    i = np.arange(u.size + 1)
    p1, p2 = np.concatenate([[0], np.cumsum(u)]), np.concatenate([[0], np.cumsum(u * u)])
    a, b = i[:, None], i[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(b > a, p2[b] - p2[a] - (p1[b] - p1[a]) ** 2 / (b - a), np.inf)
    best = cost[0]
    for _ in range(1, k):
        best = np.min(best[:, None] + cost, axis=0)
    return best[-1]


@pytest.mark.parametrize("seed", range(3))
def test_equals_the_plain_dynamic_programme_on_longer_rows(seed):
    # the divide and conquer and Knuth's bound prune candidates: none of the optimum's
    rng = np.random.default_rng(seed)
    for t in range(40):
        n, k = int(rng.integers(20, 150)), int(rng.integers(2, 20))
        v = list(_rows(seed * 100 + t, n).values())[t % 5]
        best = _plain_dp(v, min(k, len(np.unique(v))))
        np.testing.assert_allclose(sse(v, kmeans_1d(v, k)), best, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 5, 16])
def test_never_worse_than_scikit_learn(seed, k):
    from sklearn.cluster import KMeans

    for name, v in _rows(seed, 600).items():
        ours = sse(v, kmeans_1d(v, k))
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(v.reshape(-1, 1))
        theirs = sse(v, km.cluster_centers_.ravel())
        assert ours <= theirs * (1 + 1e-9) + 1e-12, (name, ours, theirs)


def test_fewer_distinct_values_than_k_gives_them_padded_with_the_largest():
    np.testing.assert_array_equal(kmeans_1d(np.array([3.0, 1.0, 3.0, 2.0, 1.0]), 5),
                                  [1, 2, 3, 3, 3])
    np.testing.assert_array_equal(kmeans_1d(np.array([0.5, -0.5]), 4), [-0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(kmeans_1d(np.array([1.0, 2.0, 3.0]), 3), [1, 2, 3])


def test_constant_rows_and_empty_rows():
    np.testing.assert_array_equal(kmeans_1d(np.full(50, 0.25), 4), np.full(4, 0.25))
    rows = np.array([[0.0, 0.0, 0.0], [7.0, 7.0, 7.0], [1.0, 2.0, 4.0]])
    keep = np.array([[False, False, False], [True, True, True], [True, True, True]])
    np.testing.assert_array_equal(kmeans_1d(rows, 2, keep),
                                  [[0, 0], [7, 7], [1.5, 4]])  # all masked: zeros
    assert kmeans_1d(np.zeros((3, 0)), 2).shape == (3, 2)


def test_a_batch_of_rows_gives_the_rows_one_by_one():
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.normal(0, 0.1, (6, 300)), np.round(rng.normal(0, 1, (3, 300)), 1),
                           np.full((1, 300), 0.5)])
    for k in (1, 3, 8):
        together = kmeans_1d(rows, k)
        assert together.shape == (len(rows), k)
        for r, row in enumerate(rows):
            np.testing.assert_allclose(together[r], kmeans_1d(row, k), rtol=1e-9, atol=1e-12)
    # rows of unequal lengths (the masked values left out), e.g. the non-zero weights
    keep = rng.random(rows.shape) > rng.uniform(0, 0.9, (len(rows), 1))
    keep[3] = False
    together = kmeans_1d(rows, 5, keep)
    for r, row in enumerate(rows):
        np.testing.assert_allclose(together[r], kmeans_1d(row[keep[r]], 5), rtol=1e-9,
                                   atol=1e-12)
    np.testing.assert_array_equal(together[3], np.zeros(5))


def test_batches_and_the_scikit_learn_fallback(monkeypatch):
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 0.1, (5, 400))
    whole = kmeans_1d(rows, 6)
    monkeypatch.setattr(kmeans, "BATCH_LIMIT", 2000)  # one or two rows a batch
    np.testing.assert_allclose(kmeans_1d(rows, 6), whole, rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(kmeans, "EXACT_LIMIT", 1000)  # every row to scikit-learn
    fallback = kmeans_1d(rows, 6)
    assert fallback.shape == whole.shape and np.all(np.diff(fallback, axis=1) > 0)
    assert np.all(sse(rows, fallback) >= sse(rows, whole) * (1 - 1e-9))
    assert np.all(sse(rows, fallback) <= sse(rows, whole) * 1.5)
    np.testing.assert_array_equal(kmeans_1d(np.array([1.0, 1.0, 2.0] * 200), 4), [1, 2, 2, 2])


def test_sse_counts_each_value_at_its_nearest_centroid():
    v = np.array([0.0, 0.9, 2.0, 5.0])
    assert sse(v, np.array([1.0, 4.0])) == pytest.approx(1 + 0.01 + 1 + 1)
    rows = np.array([[0.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(sse(rows, np.array([[0.0, 0.5], [1.0, 3.0]])), [0.25, 2.0])
    np.testing.assert_allclose(sse(rows, np.array([0.0, 2.0]), rows > 0), [1.0, 0.0])


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_refuses_a_bad_k(bad):
    with pytest.raises(ValueError, match="Received: k="):
        kmeans_1d(np.arange(5.0), bad)


def test_refuses_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d(np.array([0.0, np.nan]), 2)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        kmeans_1d(np.zeros((2, 2, 2)), 2)


# ------------------------------------------------------------ the Keras 3 engine's centroids

@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("skip_zeros", [False, True], ids=["all", "non-zero"])
def test_engine_kernel_centroids_are_the_exact_ones_channel_by_channel(per_channel, skip_zeros):
    from keras_colopt.engines.keras3 import compress

    rng = np.random.default_rng(0)
    view = rng.normal(0, 0.1, (72, 6)).astype(np.float32)
    view[np.abs(view) < 0.05] = 0
    view[:, 5] = 0  # a channel with no non-zero weight
    c = compress.kernel_centroids(view, 4, "kmeans++", rng, per_channel, skip_zeros)
    assert c.dtype == np.float32 and c.shape == ((6, 4) if per_channel else (4,))

    def expect(values):
        return kmeans_1d(values[values != 0] if skip_zeros else values, 4)
    want = (np.stack([expect(view[:, j].astype(np.float64)) for j in range(6)]) if per_channel
            else expect(view.ravel().astype(np.float64)))
    np.testing.assert_allclose(c, want.astype(np.float32), rtol=1e-6)
    for j in range(6 if per_channel else 0):
        np.testing.assert_array_equal(
            c[j], compress.init_centroids(view[:, j][view[:, j] != 0] if skip_zeros
                                          else view[:, j], 4, "kmeans++", rng))
    # 'linear' stays linear: equally spaced between the smallest and largest value
    lin = compress.kernel_centroids(view, 4, "linear", rng, False, skip_zeros)
    kept = view[view != 0] if skip_zeros else view
    np.testing.assert_allclose(lin, np.linspace(kept.min(), kept.max(), 4), rtol=1e-6)
