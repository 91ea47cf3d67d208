import numpy as np
import pytest

from keras_colopt import stats


def test_sparsity_counts_exact_zeros_only():
    w = np.array([[0.0, 1e-9], [0.0, -2.0]])
    assert stats.sparsity(w) == 0.5
    assert stats.sparsity(np.zeros((0,))) == 0.0


def test_unique_values_per_tensor_and_per_channel():
    # Two output channels (last axis): channel 0 holds {1, 2}, channel 1 holds {3}.
    w = np.array([[[1.0, 3.0], [2.0, 3.0]], [[1.0, 3.0], [2.0, 3.0]]])
    assert stats.unique_values(w) == 3
    assert stats.unique_values(w, axis=-1).tolist() == [2, 1]
    assert stats.unique_values(np.moveaxis(w, -1, 0), axis=0).tolist() == [2, 1]


def test_unique_values_per_channel_counts_as_numpy_unique_per_channel():
    # The count of all channels at once must equal np.unique channel by channel, for
    # every axis, with NaNs (one value, as np.unique counts them), -0.0 beside 0.0 (equal)
    # and empty channels.
    rng = np.random.default_rng(0)
    for trial in range(200):
        shape = tuple(int(d) for d in rng.integers(1, 6, size=rng.integers(2, 5)))
        w = rng.integers(-3, 3, size=shape).astype(np.float32)
        if trial % 3 == 0:
            w[rng.random(shape) < 0.2] = np.nan
        if trial % 4 == 0:
            w[w == 0] = -0.0
            w.flat[0] = 0.0
        for axis in range(-w.ndim, w.ndim):
            rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            assert stats.unique_values(w, axis=axis).tolist() == [
                np.unique(r).size for r in rows], (w, axis)
    assert stats.unique_values(np.zeros((0, 3)), axis=-1).tolist() == [0, 0, 0]
    assert stats.unique_values(np.array([[1, 1], [2, 3]], np.int8), axis=0).tolist() == [1, 2]


def test_tensor_stats_and_summary():
    a = stats.tensor_stats("a", np.array([[0.0, 1.0], [0.0, 1.0]]), channel_axis=-1)
    b = stats.tensor_stats("b", np.array([0.0, 5.0, 6.0, 7.0]))
    assert (a.zeros, a.size, a.unique, a.unique_per_channel_max) == (2, 4, 2, 1)
    assert b.unique_per_channel_max is None
    s = stats.summarize([a, b])
    assert s["zeros"] == 3 and s["size"] == 8
    assert s["sparsity"] == pytest.approx(3 / 8)
    assert s["max_unique"] == 4
    assert s["max_unique_per_channel"] == 4  # a: 1 per channel; b: no channel axis, 4


def test_entropy_bits_of_known_distributions():
    assert stats.entropy_bits(np.zeros(100)) == 0.0
    assert stats.entropy_bits([0, 1, 2, 3] * 100) == pytest.approx(800.0)   # 2 bits each
    # 75 % zeros, 25 % ones: H = 0.8113 bits per value.
    assert stats.entropy_bits([0] * 300 + [1] * 100) == pytest.approx(400 * 0.811278, rel=1e-5)
    # Per channel: each row constant -> 0 bits, though the tensor has 2 values.
    w = np.array([[5, 5, 5], [7, 7, 7]])
    assert stats.entropy_bits(w) == pytest.approx(6.0) and stats.entropy_bits(w, axis=0) == 0.0
    assert stats.entropy_bits([]) == 0.0
