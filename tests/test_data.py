"""The embedded dataset and the user's .npz data files."""

import numpy as np
import pytest

from keras_colopt import data


def test_digits_split_is_fixed_and_stratified():
    (x, y), (xt, yt) = data.load_digits()
    assert x.shape == (1437, 8, 8, 1) and xt.shape == (360, 8, 8, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(np.bincount(yt) > 30, np.ones(10, bool))
    (x2, _), _ = data.load_digits()
    assert np.array_equal(x, x2)


def test_load_npz_round_trip(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((4, 2)), y_train=np.arange(4), x_val=np.ones((2, 2)),
             y_val=np.arange(2))
    (x, y), (xv, yv) = data.load_npz(p)
    assert x.shape == (4, 2) and list(y) == [0, 1, 2, 3] and xv.shape == (2, 2)
    np.savez(p, x_train=np.zeros((4, 2)), y_train=np.arange(4))
    assert data.load_npz(p)[1] is None


@pytest.mark.parametrize("arrays,words", [
    ({"x_train": np.zeros((4, 2))}, "missing: ['y_train']"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.arange(4), "labels": np.arange(4)},
     "unexpected: ['labels']"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.arange(3)}, "x_train has 4 samples but"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.arange(4), "x_val": np.zeros((2, 2))},
     "must come together"),
    ({"x_train": np.zeros((0, 2)), "y_train": np.arange(0)}, "x_train is empty"),
])
def test_load_npz_says_what_is_wrong(tmp_path, arrays, words):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError) as e:
        data.load_npz(p)
    assert words in str(e.value)


def test_load_npz_refuses_other_files(tmp_path):
    p = tmp_path / "d.npz"
    p.write_text("not an npz")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_npz(p)
    np.savez(p, x_train=np.array([{"a": 1}] * 2, dtype=object), y_train=np.arange(2))
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_npz(p)   # object arrays would need pickle: refused
    with pytest.raises(FileNotFoundError, match="No data file"):
        data.load_npz(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="missing: \\['x_val', 'y_val'\\]"):
        np.savez(p, x_train=np.zeros((2, 1)), y_train=np.arange(2))
        data.load_npz(p, require_validation=True)


def test_load_npz_refuses_scalars(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.float32(1.0), y_train=np.arange(1))
    with pytest.raises(ValueError, match=r"\['x_train'\] hold a single number"):
        data.load_npz(p)
