"""Pure numpy statistics of weight tensors: sparsity and unique values.

Nothing here knows about Keras or tfmot: every function takes arrays, so it can
measure a Keras kernel, a fake-quantized kernel or an int8 tensor read from a
`.tflite` file alike.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


def sparsity(weights) -> float:
    """Fraction of exactly-zero entries in `weights`.

    Args:
        weights: an array-like of any shape.

    Returns:
        A float in [0, 1]; 0.0 for an empty array.

    Example:
        >>> sparsity([[0.0, 1.0], [0.0, 2.0]])
        0.5
    """
    w = np.asarray(weights)
    if w.size == 0:
        return 0.0
    return float(np.count_nonzero(w == 0)) / float(w.size)


def unique_values(weights, axis: Optional[int] = None):
    """Number of distinct values in `weights`, per tensor or per channel.

    Args:
        weights: an array-like.
        axis: `None` counts over the whole tensor and returns an int. An int
            counts separately for every index along that axis (the output
            channel: `-1` for a Keras Conv2D/Dense kernel, `0` for a TFLite
            CONV_2D/FULLY_CONNECTED filter) and returns a 1-D int array.

    Example:
        >>> unique_values([[1.0, 2.0], [1.0, 3.0]])
        3
        >>> unique_values([[1.0, 2.0], [1.0, 3.0]], axis=-1).tolist()
        [1, 2]
    """
    w = np.asarray(weights)
    if axis is None:
        return int(np.unique(w).size)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    if moved.shape[1] == 0:
        return np.zeros(moved.shape[0], dtype=np.int64)
    # All channels at once (one sort instead of a np.unique per channel: a callback
    # counts every layer's channels each epoch), counted as np.unique counts: sorted
    # neighbours that differ, NaNs as one value.
    s = np.sort(moved, axis=1)
    new_value = s[:, 1:] != s[:, :-1]
    if s.dtype.kind in "fc":
        nan = np.isnan(s)
        if nan.any():
            new_value &= ~(nan[:, 1:] & nan[:, :-1])
    return (new_value.sum(axis=1) + 1).astype(np.int64)


def entropy_bits(weights, axis: Optional[int] = None) -> float:
    """Bits an ideal order-0 coder needs for `weights` given their value distribution.

    The empirical entropy of the values times their count: the limit gzip-like
    compression approaches for a tensor whose values are independent draws
    (it can beat it only by exploiting order, e.g. runs of zeros).

    Args:
        weights: an array-like (e.g. an int8 weight tensor of a `.tflite`).
        axis: `None` uses one distribution for the whole tensor; an int codes
            each index along that axis (an output channel) with its own
            distribution, as per-channel clustering makes them differ.

    Example:
        >>> entropy_bits([0, 0, 1, 1])
        4.0
    """
    w = np.asarray(weights)
    if w.size == 0:
        return 0.0
    rows = [w.reshape(-1)] if axis is None else list(
        np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1))
    bits = 0.0
    for row in rows:
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        bits += float(-(counts * np.log2(p)).sum())
    return bits


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Compression statistics of one weight tensor.

    Attributes:
        name: the tensor's name (a layer name, or a TFLite tensor name).
        shape: the tensor's shape.
        sparsity: fraction of exact zeros.
        zeros: number of exact zeros.
        size: number of entries.
        unique: number of distinct values over the whole tensor.
        unique_per_channel_max: the largest number of distinct values in one
            output channel, or `None` when no channel axis was given.
    """

    name: str
    shape: tuple
    sparsity: float
    zeros: int
    size: int
    unique: int
    unique_per_channel_max: Optional[int] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def tensor_stats(name: str, weights, channel_axis: Optional[int] = None) -> TensorStats:
    """Computes `TensorStats` of `weights`.

    Args:
        name: a label for the tensor.
        weights: an array-like.
        channel_axis: the output-channel axis for the per-channel count, or
            `None` to skip it.
    """
    w = np.asarray(weights)
    per_channel = None
    if channel_axis is not None and w.ndim > 1:
        per_channel = int(unique_values(w, axis=channel_axis).max())
    return TensorStats(
        name=name,
        shape=tuple(int(d) for d in w.shape),
        sparsity=sparsity(w),
        zeros=int(np.count_nonzero(w == 0)),
        size=int(w.size),
        unique=unique_values(w),
        unique_per_channel_max=per_channel,
    )


def kernel_stats(kernels) -> list:
    """`tensor_stats` of each `(name, array, channel axis)` in `kernels` (an engine's
    `kernels(layer)`), in order."""
    return [tensor_stats(n, w, axis) for n, w, axis in kernels]


def summarize(stats) -> dict:
    """Model-wide aggregates of a list of `TensorStats`.

    Returns:
        `{"sparsity": zeros/size over all tensors, "max_unique": the largest
        per-tensor unique count, "max_unique_per_channel": the largest
        per-channel count (per-tensor where no channel axis was given),
        "zeros": ..., "size": ...}`.
    """
    stats = list(stats)
    zeros = sum(s.zeros for s in stats)
    size = sum(s.size for s in stats)
    return {
        "sparsity": (zeros / size) if size else 0.0,
        "max_unique": max((s.unique for s in stats), default=0),
        "max_unique_per_channel": max((s.unique_per_channel_max or s.unique for s in stats),
                                      default=0),
        "zeros": zeros,
        "size": size,
    }
