"""The tfmot engine: tf_keras (Keras 2) models through tensorflow-model-optimization.

This is the only module that imports tfmot. It applies one phase of a plan to
a model (re-wrapping it), reads the weights each layer really computes with,
and reads the expectations (target sparsity, number of clusters) from the
model's wrappers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

# tfmot sets TF_USE_LEGACY_KERAS=1 as a side effect of its import; we import it
# here only, and restore the user's environment right after.
_prev_legacy = os.environ.get("TF_USE_LEGACY_KERAS")
import tf_keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from tensorflow_model_optimization.python.core.clustering.keras import (  # noqa: E402
    cluster_wrapper, clustering_registry)
from tensorflow_model_optimization.python.core.quantization.keras import (  # noqa: E402
    quantize_wrapper)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (  # noqa: E402,E501
    cluster_preserve_quantize_registry as cpq)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (  # noqa: E402,E501
    prune_preserve_quantize_registry as ppq)
from tensorflow_model_optimization.python.core.sparsity.keras import (  # noqa: E402
    prune_registry, pruning_wrapper)

from keras_colopt import stats  # noqa: E402
from keras_colopt.engines.tfmot_flatten import flatten_nested, nested_models, restore_training_args, walk  # noqa: E402,F401,E501

if _prev_legacy is None:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
else:
    os.environ["TF_USE_LEGACY_KERAS"] = _prev_legacy

log = logging.getLogger("keras_colopt")

_INITS = {
    "kmeans++": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
    "linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
    "density": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
    "random": tfmot.clustering.keras.CentroidInitialization.RANDOM,
}

_KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")
_WEIGHTED = (tf_keras.layers.Conv2D, tf_keras.layers.Dense, tf_keras.layers.DepthwiseConv2D)


# --------------------------------------------------------------------------- model checks

def check_model(model, compiled: bool = True) -> None:
    """Raises a clear error unless `model` is a (compiled) tf_keras Sequential/Functional model."""
    if isinstance(model, tf_keras.Model):
        pass
    elif _is_keras3(model):
        raise TypeError(
            "This is a Keras 3 model (`import keras`), which tensorflow-model-optimization "
            "cannot wrap (its cluster_weights silently returns None for one). Expected a "
            "tf_keras (Keras 2) model. Build the model with `import tf_keras as keras` "
            "(pip package tf-keras), or rebuild it from its config with tf_keras. "
            f"Received: model of type {type(model).__module__}.{type(model).__name__}")
    else:
        raise TypeError(
            "Expected a compiled tf_keras Sequential or Functional model. "
            f"Received: model={model!r} of type {type(model).__name__}")
    if not (isinstance(model, tf_keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise TypeError(
            f"Model '{model.name}' is a subclassed tf_keras.Model ({type(model).__name__}); "
            "tfmot can only re-wrap the layers of Sequential and Functional models. Expected "
            "a Sequential or Functional model. Rebuild it with the Functional API "
            "(keras.Model(inputs, outputs)).")
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built. Expected a model with known input shapes. "
            "Give the first layer an input_shape (or use keras.Input) before calling.")
    if compiled and (getattr(model, "optimizer", None) is None
                     or not getattr(model, "compiled_loss", None)):
        raise ValueError(
            f"Model '{model.name}' is not compiled. Expected a model compiled with an "
            "optimizer and a loss: every phase re-compiles with the same loss and metrics "
            "and a fresh copy of your optimizer. Call model.compile(optimizer=..., loss=..., "
            "metrics=[...]) first.")


def _is_keras3(model) -> bool:
    return type(model).__module__.startswith("keras.") or any(
        c.__module__.startswith("keras.src") for c in type(model).__mro__)


def clone_model(model):
    """A deep copy of `model` (new layer objects, same weights) that shares nothing with it."""
    clone = tf_keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _fresh(obj):
    """A new copy of each Metric/Loss object in a (nested) compile argument: metric state
    must not be shared between the models of two phases."""
    if isinstance(obj, (tf_keras.metrics.Metric, tf_keras.losses.Loss)):
        return type(obj).from_config(obj.get_config())
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fresh(v) for v in obj)
    return obj


def compile_config(model) -> dict:
    """What `model.compile` was given, in a form that can compile another model."""
    cl = model.compiled_loss
    cm = model.compiled_metrics
    opt = model.optimizer
    return {
        "optimizer_class": type(opt),
        "optimizer_config": opt.get_config(),
        "loss": model.loss,
        "loss_weights": getattr(cl, "_user_loss_weights", None),
        "metrics": getattr(cm, "_user_metrics", None),
        "weighted_metrics": getattr(cm, "_user_weighted_metrics", None),
        "run_eagerly": model._run_eagerly,
        "jit_compile": getattr(model, "_jit_compile", None),
        "steps_per_execution": int(model._steps_per_execution.numpy())
        if getattr(model, "_steps_per_execution", None) is not None else 1,
    }


def compile_like(model, cfg: dict, learning_rate: Optional[float] = None) -> None:
    """Compiles `model` as the original was, with a fresh optimizer (optionally a new rate)."""
    ocfg = dict(cfg["optimizer_config"])
    if learning_rate is not None:
        ocfg["learning_rate"] = float(learning_rate)
    optimizer = cfg["optimizer_class"].from_config(ocfg)
    model.compile(optimizer=optimizer, loss=_fresh(cfg["loss"]), loss_weights=cfg["loss_weights"],
                  metrics=_fresh(cfg["metrics"]), weighted_metrics=_fresh(cfg["weighted_metrics"]),
                  run_eagerly=cfg["run_eagerly"], steps_per_execution=cfg["steps_per_execution"],
                  jit_compile=cfg["jit_compile"])


# --------------------------------------------------------------------------- layers

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
    return list(prune_registry.PruneRegistry._weight_names(layer))


def _clusterable_weight_names(layer) -> List[str]:
    if isinstance(layer, tfmot.clustering.keras.ClusterableLayer):
        return [n for n, _ in layer.get_clusterable_weights()]
    if not clustering_registry.ClusteringRegistry.supports(layer):
        return []
    return list(clustering_registry.ClusteringRegistry._weight_names(layer))


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
    if sel is None:
        chosen = [l for l in layers if _has_kernel(l) or kind == "quantize"]
    elif callable(sel):
        chosen = [l for l in layers if sel(l)]
        if not chosen:
            raise ValueError(
                f"{type(phase).__name__}: the `layers` predicate selected no layer of model "
                f"'{model.name}'. Expected it to return True for at least one of: "
                f"{sorted(by_name)}. Received: layers={sel!r}")
    else:
        missing = [n for n in sel if n not in by_name]
        if missing:
            raise ValueError(
                f"{type(phase).__name__}: no layer named {missing} in model '{model.name}'. "
                f"Expected names from: {[l.name for l in layers]}. Fix the names in `layers=`. "
                f"Received: layers={sel!r}")
        chosen = [by_name[n] for n in sel]
    def ok(layer):
        return can_touch(layer, kind) and not (kind == "cluster" and _too_small(layer, phase))

    touched = [l.name for l in chosen if ok(l)]
    skipped = [l.name for l in chosen if not ok(l) and l.weights]
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
        for node in layer._outbound_nodes:
            nxt = base_layer(node.outbound_layer)
            if _is_relu_layer(nxt):
                found[layer.name] = nxt.name
    return found


# --------------------------------------------------------------------------- apply phases

def pruning_schedule(phase, steps_per_epoch: int):
    """The tfmot schedule of a Prune phase for `steps_per_epoch` steps per epoch.

    The ramp covers the first `max(1, epochs - 1)` epochs and ends on a step
    where the mask is updated, so the target is reached exactly.

    Returns:
        (schedule, end_step): `end_step` is the pruning step after which the
        layer holds its target sparsity.
    """
    ramp_epochs = max(1, phase.epochs - 1)
    ramp_steps = max(1, ramp_epochs * steps_per_epoch)
    frequency = max(1, ramp_steps // 10)
    end_step = (ramp_steps // frequency) * frequency
    if phase.schedule == "constant" or phase.m_by_n is not None:
        return (tfmot.sparsity.keras.ConstantSparsity(
            phase.sparsity, begin_step=0, end_step=-1, frequency=frequency), frequency)
    return (tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=phase.initial_sparsity, final_sparsity=phase.sparsity,
        begin_step=0, end_step=end_step, frequency=frequency), end_step)


def strip(model):
    """Removes pruning and clustering wrappers (QAT wrappers stay: the converter reads them)."""
    if any(isinstance(l, pruning_wrapper.PruneLowMagnitude) for _, l in walk(model)):
        model = tfmot.sparsity.keras.strip_pruning(model)
    if any(isinstance(l, cluster_wrapper.ClusterWeights) for _, l in walk(model)):
        model = tfmot.clustering.keras.strip_clustering(model)
    return model


def apply_phase(model, planned, steps_per_epoch: int):
    """Wraps `model` for one planned phase.

    Returns:
        (new_model, companion_callbacks, touched_layer_names)
    """
    phase = planned.phase
    kind = phase.kind
    if kind == "train":
        return model, [], []
    # Drop the previous phase's training wrappers; their work is in the weights now.
    model = strip(model)
    touched, _ = select_layers(model, phase, kind)  # the skipped ones were logged by preflight
    wanted = set(touched)

    if kind == "prune":
        schedule, _ = pruning_schedule(phase, steps_per_epoch)
        kwargs = {"pruning_schedule": schedule}
        if phase.m_by_n is not None:
            kwargs["sparsity_m_by_n"] = tuple(phase.m_by_n)

        def wrap(layer):
            if layer.name in wanted:
                return tfmot.sparsity.keras.prune_low_magnitude(layer, **kwargs)
            return layer
        new = tf_keras.models.clone_model(model, clone_function=wrap)
        return new, [tfmot.sparsity.keras.UpdatePruningStep()], touched

    if kind == "cluster":
        kwargs = {"number_of_clusters": phase.clusters,
                  "cluster_centroids_init": _INITS[phase.init],
                  "preserve_sparsity": planned.preserve_sparsity,
                  "cluster_per_channel": phase.per_channel}

        def wrap(layer):
            if layer.name not in wanted:
                return layer
            layer_kwargs = dict(kwargs)
            short = _kmeans_short_channels(layer, phase, planned.preserve_sparsity)
            if short:
                log.warning(
                    "%s: layer '%s' has output channel(s) %s with fewer %s than clusters=%d, "
                    "where tfmot's per-channel kmeans++ initialization fails; that layer's "
                    "centroids are initialized 'linear' instead.", planned.label, layer.name,
                    short[:8], "non-zero weights" if planned.preserve_sparsity else
                    "distinct weights", phase.clusters)
                layer_kwargs["cluster_centroids_init"] = _INITS["linear"]
            if type(layer) is tf_keras.layers.Conv2D:
                # tfmot's cluster_weights counts a Conv2D's channels from its last trainable
                # weight, which is the kernel itself when use_bias=False, and then silently
                # skips the layer as "too small" for per-channel clustering. Our own check
                # (_too_small) ran in select_layers; wrap it directly.
                return cluster_wrapper.ClusterWeights(layer, **layer_kwargs)
            return tfmot.clustering.keras.cluster_weights(layer, **layer_kwargs)
        new = tf_keras.models.clone_model(model, clone_function=wrap)
        return new, [], touched

    if kind == "quantize":
        new = _quantize(model, planned, wanted)
        return new, [], [n for n in touched if _has_kernel(_find(model, n))]
    raise AssertionError(kind)


def _clustered_centroids(planned):
    """A replacement for tfmot's cluster-preserving `get_centroids`, for one Quantize phase.

    tfmot reads the centroids a CQAT/PCQAT wrapper trains from the distinct values of the
    kernel it wraps, and decides per channel or per tensor by itself: any Conv2D goes per
    channel when its channels hold numbers of distinct values that differ by at most one,
    otherwise per tensor. Two silent losses follow. A per-channel clustered Conv2D whose
    channels differ by more (an empty cluster, a pruned channel) falls back to per-tensor
    values, and past 1,024 of them tfmot skips the layer ("No clustering performed ... Too
    many centroids"): its clusters are gone after one step (MobileNet's pointwise convs).
    A per-tensor clustered Conv2D goes per channel, each channel's copy of the shared
    centroids then drifts on its own, and the tensor ends with up to clusters x channels
    values. Here a kernel that holds at most `clusters` (+ 1 for the pruned zero) values
    per channel, or per tensor, keeps the layout the plan clustered it with; channels with
    fewer values are padded with copies of their last one (as tfmot pads a channel one
    short): spare centroids no weight points to at first, which a channel may take up as
    it trains, never past the number all channels have. Any other kernel (not clustered by
    the plan) gets tfmot's own answer.
    """
    original = cpq.get_centroids
    limit = int(planned.clusters or 0) + 1

    def get_centroids(layer, weight, data_format):
        w = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        conv = isinstance(getattr(layer, "layer", None), tf_keras.layers.Conv2D)
        if planned.per_channel and conv and w.ndim == 4 and data_format != "channels_first":
            rows = np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)
            parts = [np.unique(r, return_inverse=True) for r in rows]
            width = max(u.size for u, _ in parts)
            if width <= limit:
                centroids = np.stack([np.concatenate([u, np.repeat(u[-1:], width - u.size)])
                                      for u, _ in parts]).astype(w.dtype)
                lookup = np.moveaxis(np.stack([i.reshape(w.shape[:-1]) for _, i in parts]),
                                     0, -1).astype(np.int32)
                return tf.constant(centroids), width, tf.constant(lookup), True
        values, index = np.unique(w, return_inverse=True)
        if values.size <= limit:
            return (tf.constant(values.astype(w.dtype)), int(values.size),
                    tf.constant(index.reshape(w.shape).astype(np.int32)), False)
        return original(layer, weight, data_format)
    return get_centroids


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _quantize(model, planned, wanted):
    """quantize_annotate the `wanted` layers and quantize_apply the plan's scheme."""
    def annotate(layer):
        if layer.name in wanted and not isinstance(layer, tf_keras.layers.InputLayer):
            return tfmot.quantization.keras.quantize_annotate_layer(layer)
        return layer
    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    if planned.preserve_clusters:
        scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
            preserve_sparsity=planned.preserve_sparsity)
    elif planned.preserve_sparsity:
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    else:
        scheme = tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()
    patch = (_patched(cpq, "get_centroids", _clustered_centroids(planned))
             if planned.preserve_clusters else contextlib.nullcontext())
    with tfmot.quantization.keras.quantize_scope(), patch:
        return restore_training_args(tfmot.quantization.keras.quantize_apply(annotated, scheme),
                                     model)


def _preserving(layer) -> bool:
    """Whether a QAT wrapper's kernel quantizer preserves sparsity or clusters."""
    return any(isinstance(q, (cpq.ClusterPreserveDefaultWeightsQuantizer,
                              ppq.PrunePreserveDefaultWeightsQuantizer))
               for _, q, _ in getattr(layer, "_weight_vars", []))


@contextlib.contextmanager
def _filtered(logger_name: str, keep):
    """Drops the records of one logger for which `keep(record)` is False, for a while."""
    f = logging.Filter()
    f.filter = keep
    logger = logging.getLogger(logger_name)
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def dry_run_quantize(model, planned, touched, compressed) -> List[str]:
    """Applies a Quantize phase to a throw-away copy of `model`, before any training.

    Raises ValueError, with tfmot's reason, when tfmot cannot quantize the model.

    Returns:
        The layers of `compressed` (pruned or clustered earlier in the plan) whose kernel
        would be quantized without the plan's preservation (tfmot gives them another
        quantize config, e.g. when it fuses them with the layer after).
    """
    import warnings

    # The copy's weights do not matter to what is checked here (which quantize config each
    # layer gets, whether tfmot raises): a throw-away copy with fresh weights, whose kernels
    # hold two values so that the cluster-preserving quantizers build in milliseconds
    # instead of computing centroids of random weights (seconds on a MobileNet).
    copy = tf_keras.models.clone_model(model)
    _two_valued_kernels(copy)
    # tfmot's quantizers warn on the root logger and with warnings.warn about the untrained
    # copy ("no zero weights", "too many centroids"): noise here, not news.
    try:
        with _filtered("", lambda record: False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = _quantize(copy, planned, set(touched))
    except Exception as e:  # tfmot raises RuntimeError/ValueError/KeyError for unsupported layouts
        raise ValueError(
            f"{planned.label}: tfmot cannot quantize model '{model.name}' as planned: "
            f"{type(e).__name__}: {e}. Expected layers tfmot's 8-bit scheme supports (Conv2D, "
            "Dense, DepthwiseConv2D, BatchNormalization after a convolution, ReLU, pooling, "
            "...). Restrict the phase with Quantize(layers=[...]), or change those layers."
        ) from e
    if not (planned.preserve_sparsity or planned.preserve_clusters):
        return []
    lost = []
    for layer in q.layers:
        name = base_name(layer)
        if name in compressed and name in touched and _has_kernel(base_layer(layer)) and \
                not _preserving(layer):
            lost.append(name)
    return lost


def _two_valued_kernels(model) -> None:
    for layer in model.layers:
        for attr in _KERNEL_ATTRS:
            v = getattr(layer, attr, None)
            if v is None or not hasattr(v, "assign") or not v.shape.rank:
                continue
            shape = tuple(v.shape)
            k = np.zeros((int(np.prod(shape[:-1])), shape[-1]), np.float32)
            k[1::2] = 0.5
            v.assign(k.reshape(shape))


def unpreserved_clusters(model, names) -> Dict[str, str]:
    """{layer: why} for the layers among `names` whose CQAT/PCQAT wrapper trains no clusters.

    tfmot's cluster-preserving quantizer silently quantizes such a kernel as plain QAT
    ("No clustering performed"): after one step its clusters are gone.
    """
    lost = {}
    for layer in model.layers:
        name = base_name(layer)
        if name not in names or not isinstance(layer, quantize_wrapper.QuantizeWrapper):
            continue
        for w, q, qvars in getattr(layer, "_weight_vars", []):
            if isinstance(q, cpq.ClusterPreserveDefaultWeightsQuantizer) and not (
                    isinstance(qvars, dict) and cpq.CLUSTER_CENTROIDS in qvars):
                k = np.asarray(w.numpy())
                counts = stats.unique_values(k, axis=-1) if k.ndim > 1 else [
                    stats.unique_values(k)]
                lost[name] = (f"{stats.unique_values(k)} distinct values in the tensor, "
                              f"{min(counts)}-{max(counts)} per output channel")
    return lost


def _kmeans_short_channels(layer, phase, preserve_sparsity) -> List[int]:
    """Output channels too small for tfmot's per-channel kmeans++ (it samples `clusters`
    points per channel, among the non-zero weights when sparsity is preserved)."""
    if not (phase.per_channel and phase.init == "kmeans++"
            and isinstance(layer, tf_keras.layers.Conv2D) and _has_kernel(layer)):
        return []
    k = np.asarray(layer.kernel.numpy())
    per = np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)
    short = []
    for c, row in enumerate(per):
        points = row[row != 0] if preserve_sparsity else row
        if np.unique(points).size < phase.clusters:
            short.append(c)
    return short


def _find(model, name):
    for l in model.layers:
        if base_name(l) == name:
            return base_layer(l)
    raise KeyError(name)


# --------------------------------------------------------------------------- effective weights

def _channel_axis(layer, weight_name: str) -> Optional[int]:
    if "depthwise" in weight_name:
        return -2
    return -1


def kernels(layer) -> List[Tuple[str, np.ndarray, Optional[int]]]:
    """The kernels `layer` really computes with, as numpy arrays.

    Reading a wrapper's raw variables is wrong in three cases, each handled:
    a pruned kernel is `weight * mask`; a clustering wrapper's kernel comes
    from its centroids once re-associated (done here, as its call does); a QAT
    wrapper's kernel is what its weight quantizer outputs (which masks for
    PQAT and gathers centroids for CQAT/PCQAT), fake-quantized.

    Returns:
        [(weight_name, array, channel_axis)] for each kernel-like weight.
    """
    if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
        out = []
        for w, mask, _ in getattr(layer, "pruning_vars", []):
            n = _short(w.name)
            out.append((n, (w * mask).numpy(), _channel_axis(layer.layer, n)))
        return out
    if isinstance(layer, cluster_wrapper.ClusterWeights):
        if not layer.original_clusterable_weights:
            return []
        layer.update_clustered_weights_associations()
        return [(n, np.asarray(layer.get_weight_from_layer(n)), _channel_axis(layer.layer, n))
                for n in layer.original_clusterable_weights]
    if isinstance(layer, quantize_wrapper.QuantizeWrapper):
        out = []
        for w, quantizer, qvars in getattr(layer, "_weight_vars", []):
            n = _short(w.name)
            if n not in _KERNEL_ATTRS:
                continue
            out.append((n, np.asarray(quantizer(w, False, weights=qvars)),
                        _channel_axis(layer.layer, n)))
        return out
    return [(a, getattr(layer, a).numpy(), _channel_axis(layer, a))
            for a in _KERNEL_ATTRS if getattr(layer, a, None) is not None]


def _short(name: str) -> str:
    return name.split(":")[0].split("/")[-1]


# --------------------------------------------------------------------------- expectations

def expectations(model) -> Dict[str, dict]:
    """What the model's wrappers promise, per layer path name (see `walk`: the base name,
    `backbone/conv1` inside a nested model).

    Returns:
        {layer: {"sparsity": float or None, "sparsity_ready": bool,
                 "clusters": int or None, "per_channel": bool, "wrapper": str}}
        `sparsity_ready` is False while a pruning schedule is still ramping.
    """
    out = {}
    for name, layer in walk(model):
        e = None
        if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
            if not getattr(layer, "pruning_vars", None):
                continue  # a layer without prunable weights, wrapped along with the model
            sched = layer.pruning_schedule
            if layer.sparsity_m_by_n:
                m, n = layer.sparsity_m_by_n
                target = 1.0 - m / n
            else:
                target = float(getattr(sched, "final_sparsity",
                                       getattr(sched, "target_sparsity", 0.0)))
            end = int(getattr(sched, "end_step", -1))
            begin = int(getattr(sched, "begin_step", 0))
            step = int(layer.pruning_step.numpy()) if hasattr(layer, "pruning_step") else -1
            freq = int(getattr(sched, "frequency", 1))
            # A mask update happens at steps begin + k * frequency, up to end_step.
            ready = step >= (end if end > 0 else begin + freq)
            e = {"sparsity": target, "sparsity_ready": ready, "clusters": None,
                 "per_channel": False, "wrapper": "prune"}
        elif isinstance(layer, cluster_wrapper.ClusterWeights):
            if not layer.original_clusterable_weights:
                continue
            masks = list(layer.sparsity_masks.values()) if layer.preserve_sparsity else []
            e = {"sparsity": _mask_sparsity(masks), "sparsity_ready": True,
                 "clusters": layer.number_of_clusters,
                 "per_channel": bool(layer.cluster_per_channel), "wrapper": "cluster"}
        elif isinstance(layer, quantize_wrapper.QuantizeWrapper):
            sp, cl, pc = None, None, False
            for _, quantizer, qvars in getattr(layer, "_weight_vars", []):
                if isinstance(quantizer, cpq.ClusterPreserveDefaultWeightsQuantizer):
                    cent = qvars.get(cpq.CLUSTER_CENTROIDS)
                    if cent is not None:
                        cl = int(cent.shape[-1])
                        pc = len(cent.shape) > 1
                    if cpq.SPARSITY_MASK in qvars and quantizer.preserve_sparsity:
                        sp = _mask_sparsity([qvars[cpq.SPARSITY_MASK]])
                elif isinstance(quantizer, ppq.PrunePreserveDefaultWeightsQuantizer):
                    sp = _mask_sparsity([qvars["sparsity_mask"]])
            if sp is not None or cl is not None:
                e = {"sparsity": sp, "sparsity_ready": True, "clusters": cl, "per_channel": pc,
                     "wrapper": "quantize"}
        if e is not None:
            out[name] = e
    return out


def _mask_sparsity(masks) -> Optional[float]:
    if not masks:
        return None
    zeros = sum(int(np.count_nonzero(np.asarray(m) == 0)) for m in masks)
    size = sum(int(np.asarray(m).size) for m in masks)
    return zeros / size if size else None


def wrapper_kind(model) -> str:
    """A label for what the model's wrappers do: "prune", "cluster", "QAT", "PQAT", ... or "none"."""
    kinds = set()
    for _, layer in walk(model):
        if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
            kinds.add("prune")
        elif isinstance(layer, cluster_wrapper.ClusterWeights):
            kinds.add("cluster")
        elif isinstance(layer, quantize_wrapper.QuantizeWrapper):
            kinds.add("quantize")
    if "quantize" in kinds:
        e = expectations(model).values()
        sp = any(v["sparsity"] is not None for v in e)
        cl = any(v["clusters"] is not None for v in e)
        return {(False, False): "QAT", (True, False): "PQAT", (False, True): "CQAT",
                (True, True): "PCQAT"}[(sp, cl)]
    return "+".join(sorted(kinds)) or "none"


def is_qat(model) -> bool:
    return any(isinstance(l, quantize_wrapper.QuantizeWrapper) for _, l in walk(model))


def quantized_per_channel(layer) -> bool:
    """Whether a QAT wrapper quantizes this layer's kernel per output channel."""
    if not isinstance(layer, quantize_wrapper.QuantizeWrapper):
        return False
    return any(getattr(q, "per_axis", False) for _, q, _ in getattr(layer, "_weight_vars", []))


# --------------------------------------------------------------------------- activation folding

_FOLDABLE = {"relu": "relu", "relu6": "relu6"}


def _foldable_activation(layer) -> Optional[str]:
    """The activation name a standalone activation layer can be folded into, or None."""
    if isinstance(layer, tf_keras.layers.ReLU):
        cfg = layer.get_config()
        if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
            return None
        mv = cfg.get("max_value")
        if mv is None:
            return "relu"
        return "relu6" if float(mv) == 6.0 else None
    if isinstance(layer, tf_keras.layers.Activation):
        name = tf_keras.activations.serialize(layer.activation)
        name = name if isinstance(name, str) else None
        return _FOLDABLE.get(name)
    return None


def fold_plan(model) -> Tuple[Dict[str, Tuple[str, str]], Dict[str, str]]:
    """Which (weighted layer, activation layer) pairs can be folded into one layer.

    Returns:
        (foldable, unfoldable): foldable maps weighted layer -> (activation
        layer, activation name); unfoldable maps weighted layer -> reason.
    """
    foldable, unfoldable = {}, {}
    for wname, aname in activation_after(model).items():
        w, a = _find(model, wname), _find(model, aname)
        act = _foldable_activation(a)
        if act is None:
            unfoldable[wname] = (f"activation layer '{aname}' is not a plain relu/relu6 "
                                 "(it has a threshold, a slope or another max_value)")
        elif len(w._outbound_nodes) != 1 or len(w._inbound_nodes) != 1 \
                or len(a._inbound_nodes) != 1:
            unfoldable[wname] = f"'{wname}' or '{aname}' is shared or has several consumers"
        elif tf_keras.activations.serialize(w.activation) != "linear":
            unfoldable[wname] = f"'{wname}' already has an activation"
        else:
            foldable[wname] = (aname, act)
    return foldable, unfoldable


def fold_activations(model, pairs: Dict[str, Tuple[str, str]]):
    """Folds standalone activation layers into the weighted layer before them.

    `Conv2D(activation=None) -> ReLU()` becomes `Conv2D(activation="relu")`:
    the same function, but one that tfmot's PQAT/CQAT/PCQAT preserve (with a
    separate ReLU layer they silently quantize the Conv2D without preservation).

    Args:
        model: a Sequential or Functional model (not modified).
        pairs: from `fold_plan`: weighted layer -> (activation layer, activation).

    Returns:
        A new model with the same weights, without the folded activation layers.
    """
    if not pairs:
        return model
    config = model.get_config()
    removed = {aname: wname for wname, (aname, _) in pairs.items()}
    for entry in config["layers"]:
        name = entry["config"]["name"]
        if name in pairs:
            entry["config"]["activation"] = pairs[name][1]
    config["layers"] = [e for e in config["layers"] if e["config"]["name"] not in removed]
    if isinstance(model, tf_keras.Sequential):
        new = tf_keras.Sequential.from_config(config)
    else:
        def rename(obj):
            if isinstance(obj, list):
                if obj and isinstance(obj[0], str) and obj[0] in removed:
                    return [removed[obj[0]]] + obj[1:]
                return [rename(o) for o in obj]
            if isinstance(obj, dict):
                return {k: rename(v) for k, v in obj.items()}
            return obj
        for entry in config["layers"]:
            entry["inbound_nodes"] = rename(entry.get("inbound_nodes", []))
        config["output_layers"] = rename(config["output_layers"])
        new = tf_keras.Model.from_config(config)
    old = {l.name: l for l in model.layers}
    for layer in new.layers:
        layer.set_weights(old[layer.name].get_weights())
    return new


# --------------------------------------------------------------------------- preflight

def preflight(model, plan) -> Dict[str, List[str]]:
    """Checks every phase of `plan` against `model` before any training.

    Raises ValueError for a `layers=` selection that names a missing or
    unsupported layer, for a phase that can touch no layer, for a Quantize
    phase tfmot cannot apply to the model (found by a dry run on a copy), and
    for a pruned/clustered layer that preserving QAT would silently quantize
    without preservation (a standalone activation that cannot be folded, or
    another layout tfmot fuses).

    Returns:
        {phase label: [layers it cannot touch]} for the log.
    """
    skipped = {}
    pruned, clustered = set(), set()
    for planned in plan:
        if planned.phase.kind == "train":
            continue
        touched, skip = select_layers(model, planned.phase, planned.phase.kind)
        skipped[planned.label] = skip
        if not touched or (planned.phase.kind == "quantize"
                           and not any(_has_kernel(_find(model, n)) for n in touched)):
            raise ValueError(
                f"{planned.label}: model '{model.name}' has no layer this phase can "
                f"{planned.phase.kind} (layers it cannot touch: {skip or 'none'}). Expected at "
                "least one supported layer with weights (Dense, Conv2D, ...). Remove the phase "
                "or change the model.")
        if planned.phase.kind == "prune":
            pruned = set(touched)
        elif planned.phase.kind == "cluster":
            clustered = set(touched)
        elif planned.phase.kind == "quantize":
            compressed = (pruned if planned.preserve_sparsity else set()) | (
                clustered if planned.preserve_clusters else set())
            unfoldable = {k: v for k, v in fold_plan(model)[1].items()
                          if k in touched and k in compressed}
            if unfoldable:
                items = "; ".join(f"'{k}': {v}" for k, v in unfoldable.items())
                raise ValueError(
                    f"{planned.label}: layer(s) {sorted(unfoldable)} are followed by a "
                    "standalone activation layer, which makes tfmot quantize them without "
                    f"preservation (their sparsity/clusters would be lost silently): {items}. "
                    "Expected the activation inside the layer, e.g. Conv2D(..., "
                    "activation='relu'). Move it there, or exclude these layers with "
                    "Quantize(layers=[...]).")
            lost = dry_run_quantize(model, planned, touched, compressed)
            if lost:
                raise ValueError(
                    f"{planned.label}: tfmot would quantize layer(s) {lost} without preserving "
                    "their sparsity/clusters (it gives them a quantize config of its own, e.g. "
                    "when it fuses them with the layer after them): the work of the earlier "
                    "phases would be lost silently. Expected every pruned/clustered layer to "
                    "keep a preserving weight quantizer. Exclude them from the Prune/Cluster "
                    "phases with layers=[...], or change the layer that follows them.")
    return skipped


def expected_gradient_warning(names):
    """A record filter: False for tf_keras' 'Gradients do not exist' warning when every
    variable it names is in `names`; any other variable still warns."""
    def keep(record):
        if not str(record.msg).startswith("Gradients do not exist for variables"):
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        listed = args[0] if args and isinstance(args[0], (list, tuple)) else None
        return listed is None or not set(listed) <= set(names)
    return keep


def quiet_expected_warnings(model):
    """While training `model`, hides the no-gradient warning for its CQAT/PCQAT kernels only."""
    names = gradless_by_design(model)
    if not names:
        return contextlib.nullcontext()
    return _filtered("tensorflow", expected_gradient_warning(names))


def gradless_by_design(model) -> set:
    """Variables that get no gradient by design: CQAT/PCQAT kernels, rewritten each step from
    the trained centroids (tf_keras warns 'Gradients do not exist' for them)."""
    names = set()
    for _, layer in walk(model):
        for w, _, qvars in getattr(layer, "_weight_vars", []) if isinstance(
                layer, quantize_wrapper.QuantizeWrapper) else []:
            if isinstance(qvars, dict) and cpq.CLUSTER_CENTROIDS in qvars:
                names.add(w.name)
    return names
