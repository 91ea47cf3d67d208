"""The kernels each layer of a model computes with, and their statistics.

Read through the model's engine (masked, re-clustered, fake-quantized weights, not the raw
variables), at any depth of nested models. Used by the callbacks, export, explore and the
command line; `stats` does the counting and knows nothing of Keras.
"""

from __future__ import annotations

from typing import Dict

from keras_colopt import stats
from keras_colopt.engines import get_engine


def effective_kernels(model, engine=None) -> Dict[str, list]:
    """`{layer name: [(weight name, array, channel axis)]}` of the kernels each layer
    really computes with (see `engines.tfmot.kernels`), for every layer that has one, at
    any depth of nested models: a layer's name is its path (`backbone/conv1`, see the
    engine's `walk`)."""
    engine = engine or get_engine(model, compiled=False)
    out = {}
    for name, layer in engine.walk(model):
        ks = engine.kernels(layer)
        if ks:
            out[name] = ks
    return out


def layer_stats(model, engine=None, kernels=None) -> Dict[str, stats.TensorStats]:
    """Per-layer compression statistics of the weights each layer computes with.

    Args:
        model: a model an engine accepts, wrapped or not.
        kernels: the output of `effective_kernels(model)`, when already computed.

    Returns:
        `{layer path name: TensorStats}` over every layer with a kernel; a layer's
        kernels are pooled, `unique` is the largest per-kernel count and
        `unique_per_channel_max` the largest per-output-channel count.
    """
    if kernels is None:
        kernels = effective_kernels(model, engine)
    return {name: pooled(name, stats.kernel_stats(ks)) for name, ks in kernels.items()}


def pooled(name, parts) -> stats.TensorStats:
    """One layer's statistics from its kernels' (see `layer_stats`)."""
    zeros, size = sum(p.zeros for p in parts), sum(p.size for p in parts)
    return stats.TensorStats(
        name=name, shape=parts[0].shape, sparsity=zeros / max(1, size), zeros=zeros,
        size=size, unique=max(p.unique for p in parts),
        unique_per_channel_max=max((p.unique_per_channel_max or 0) for p in parts) or None)


def transition_line(label, before, after) -> str:
    b, a = stats.summarize(before.values()), stats.summarize(after.values())
    return (f"{label}: zeros {b['zeros']}/{b['size']} ({100 * b['sparsity']:.2f}%) -> "
            f"{a['zeros']}/{a['size']} ({100 * a['sparsity']:.2f}%), max unique weights per "
            f"layer {b['max_unique']} -> {a['max_unique']} (per output channel "
            f"{b['max_unique_per_channel']} -> {a['max_unique_per_channel']})")
