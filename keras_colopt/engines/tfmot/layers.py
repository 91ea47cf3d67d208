"""Layers: what a phase can touch, which layers it selects, the user's names inside wrappers."""

from __future__ import annotations

import numpy as np
from typing import Dict, List, Tuple

from keras_colopt.engines import _flavour
from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot._deps import tf_keras, tfmot
from keras_colopt.engines.tfmot.compat import clustering_registry, prune_registry

_INITS = {
    "kmeans++": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
    "linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
    "density": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
    "random": tfmot.clustering.keras.CentroidInitialization.RANDOM,
}

_KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")
_WEIGHTED = (tf_keras.layers.Conv2D, tf_keras.layers.Dense, tf_keras.layers.DepthwiseConv2D)



def base_layer(layer):
    """The user's layer inside any tfmot wrapper."""
    while isinstance(layer, tf_keras.layers.Wrapper) and \
            type(layer).__module__.startswith("tensorflow_model_optimization"):
        layer = layer.layer
    return layer


def base_name(layer) -> str:
    return base_layer(layer).name


def _prunable_weight_names(layer) -> List[str]:
    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer):
        return [w.name for w in layer.get_prunable_weights()]
    if not prune_registry.PruneRegistry.supports(layer):
        return []
    return _registry_names(prune_registry.PruneRegistry, layer)


def _clusterable_weight_names(layer) -> List[str]:
    if isinstance(layer, tfmot.clustering.keras.ClusterableLayer):
        return [n for n, _ in layer.get_clusterable_weights()]
    if not clustering_registry.ClusteringRegistry.supports(layer):
        return []
    return _registry_names(clustering_registry.ClusteringRegistry, layer)


def _registry_names(registry, layer) -> List[str]:
    """The weights tfmot's registry compresses in a layer it supports. Its private
    `_weight_names` knows plain layers only (a KeyError for an LSTM, GRU, SimpleRNN,
    Bidirectional or MultiHeadAttention, which it wraps through their cells and sublayers):
    for those, their kernels (the trainable weights of rank 2 or more)."""
    try:
        return list(compat.registry_weight_names(registry, layer))
    except KeyError:
        return [w.name for w in layer.trainable_weights if len(w.shape) >= 2]


def can_touch(layer, kind: str) -> bool:
    """Whether a phase of `kind` ("prune", "cluster", "quantize") can apply to `layer`."""
    layer = base_layer(layer)
    if kind == "prune":
        return bool(_prunable_weight_names(layer))
    if kind == "cluster":
        return bool(_clusterable_weight_names(layer))
    if kind == "quantize":
        # Whether tfmot can quantize a layer depends on its neighbours (Conv2D+BatchNorm is
        # folded, BatchNorm alone is not): `preflight` finds out with a dry run.
        return True
    return False


def _has_kernel(layer) -> bool:
    return any(getattr(layer, a, None) is not None for a in _KERNEL_ATTRS)


def select_layers(model, phase, kind: str) -> Tuple[List[str], List[str]]:
    """Which layers a phase touches, and which weighted layers it cannot touch.

    Returns:
        (touched, skipped): base layer names. Raises ValueError for a name in
        `phase.layers` that does not exist or that the phase cannot touch.
    """
    layers = [base_layer(l) for l in model.layers]
    by_name = {l.name: l for l in layers}
    sel = phase.layers
    # By default every layer with a kernel, and any other layer holding kernels (rank >= 2
    # weights): tfmot's registries reach an LSTM's cells or an attention's projections; a
    # custom layer with a Dense inside is named as skipped.
    chosen = [by_name[n] for n in _flavour.chosen_layers(
        [(l.name, l) for l in layers], phase, model.name,
        lambda l: _has_kernel(l) or _flavour.holds_kernels(l) or kind == "quantize")]

    def ok(layer):
        return can_touch(layer, kind) and not (kind == "cluster" and _too_small(layer, phase))

    touched = [l.name for l in chosen if ok(l)]
    skipped = [l.name for l in chosen if not ok(l) and l.weights]
    if sel is None:
        # A nested subclassed model is one opaque layer to tfmot (flatten_nested opens
        # Sequential and Functional models only): its weights stay as they are; say so.
        skipped += [l.name for l in layers if isinstance(l, tf_keras.Model) and l.weights
                    and l not in chosen]
    refused = [l.name for l in chosen if not ok(l)]
    if sel is not None and not callable(sel) and refused:
        raise ValueError(
            f"{type(phase).__name__}: tfmot cannot {kind} the layer(s) {refused} you named "
            f"(type {[type(by_name[n]).__name__ for n in refused]}). Expected layers it supports "
            "(Dense, Conv1D/2D/3D, ...; DepthwiseConv2D is never pruned or clustered). Remove "
            f"them from `layers=`. Received: layers={sel!r}")
    return touched, skipped


def _is_relu_layer(layer) -> bool:
    if isinstance(layer, tf_keras.layers.ReLU):
        return True
    if isinstance(layer, tf_keras.layers.Activation):
        return tf_keras.activations.serialize(layer.activation) in ("relu", "relu6")
    return False


def _too_small(layer, phase) -> bool:
    """Whether a kernel has no more weights (per output channel, when clustering a Conv2D per
    channel) than clusters: then there is nothing to cluster (tfmot skips such a Conv2D)."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return False
    size = int(np.prod(kernel.shape))
    if phase.per_channel and isinstance(layer, tf_keras.layers.Conv2D):
        axis = 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1
        size //= int(kernel.shape[axis])
    return size <= phase.clusters


def activation_after(model) -> Dict[str, str]:
    """Weighted layers (Conv2D/Dense/DepthwiseConv2D) followed by a standalone ReLU layer
    (`ReLU` or `Activation("relu")`/`"relu6"`; other activations are not fused by tfmot).

    tfmot's quantize transforms fuse such a pair, and the preserving quantizer
    (PQAT/CQAT/PCQAT) is then not applied to the weighted layer: its sparsity
    or clusters are silently lost. Returns {weighted layer: activation layer}.
    """
    found = {}
    for layer in (base_layer(l) for l in model.layers):
        if not isinstance(layer, _WEIGHTED):
            continue
        for node in compat.outbound_nodes(layer):
            nxt = base_layer(node.outbound_layer)
            if _is_relu_layer(nxt):
                found[layer.name] = nxt.name
    return found


def _find(model, name):
    for l in model.layers:
        if base_name(l) == name:
            return base_layer(l)
    raise KeyError(name)
