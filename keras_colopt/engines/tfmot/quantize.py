"""The Quantize phase: tfmot's QAT schemes, cluster-preserving centroids, the dry run."""

from __future__ import annotations

import contextlib
import logging
import numpy as np
from typing import Dict, List

from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot._deps import tf, tf_keras, tfmot
from keras_colopt.engines.tfmot.compat import cpq, ppq, quantize_wrapper, serialization_lib
from keras_colopt.engines.tfmot.flatten import restore_training_args, walk
from keras_colopt.engines.tfmot.layers import _KERNEL_ATTRS, _find, _has_kernel, base_layer, base_name
from keras_colopt import stats

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
    """quantize_annotate the `wanted` layers (with the phase's `quantize_configs`, if any) and
    quantize_apply the plan's scheme."""
    configs = getattr(planned.phase, "quantize_configs", None) or {}

    def annotate(layer):
        if layer.name in wanted and not isinstance(layer, tf_keras.layers.InputLayer):
            return tfmot.quantization.keras.quantize_annotate_layer(
                layer, quantize_config=configs.get(layer.name))
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
    with _rebuilding(model, configs), patch:
        quantized = restore_training_args(
            tfmot.quantization.keras.quantize_apply(annotated, scheme), model)
    if planned.preserve_clusters:
        freeze_rewritten_kernels(quantized)
    return quantized


def freeze_rewritten_kernels(model) -> List[str]:
    """Takes the kernels that a CQAT/PCQAT quantizer rewrites every step out of the trained
    variables; returns their names.

    tfmot's cluster-preserving quantizer assigns the clustered kernel (gathered from the
    trained centroids) to the layer's kernel variable in each forward pass, and inference
    and the converter read that variable. The variable gets no gradient from the loss, but
    it stays trainable: a `kernel_regularizer` (the published DS-CNN and MobileNet v1 0.25
    carry L2) or an optimizer's weight decay still moves it *after* the assign, so the
    deployed kernel drifts off the centroids by about one optimizer step per weight, and at
    a rate near 1e-3 that is enough to split a cluster across two int8 levels (9 values in
    a channel clustered to 8). The regularizer never reached the centroids either (the
    assign cuts the graph); with the variable frozen it only adds a constant to the loss.
    """
    frozen = []
    for _, layer in walk(model):
        if not isinstance(layer, quantize_wrapper.QuantizeWrapper):
            continue
        inner = layer.layer
        for w, _, qvars in compat.weight_vars(layer):
            if not (isinstance(qvars, dict) and cpq.CLUSTER_CENTROIDS in qvars):
                continue
            # The lists tf_keras gathers trained variables from: the layer's, and the copy
            # QuantizeWrapperV2 keeps of them (its own order).
            lists = (compat.own_trainable_weights(inner), compat.own_trainable_weights(layer))
            if any(v is w for t in lists for v in t):
                for t in lists:
                    t[:] = [v for v in t if v is not w]
                compat.own_non_trainable_weights(inner).append(w)
                frozen.append(w.name)
    return frozen


@contextlib.contextmanager
def _rebuilding(model, quantize_configs=None):
    """The scope in which the user's live model is rebuilt from its layers' configs (tfmot's
    quantize_apply, activation folding): its custom classes known by name (`custom_classes`),
    and tf_keras' safe mode off, which otherwise refuses a Lambda's Python code. Safe mode
    guards loading untrusted files; these configs were just made from the user's own layers.
    """
    with tfmot.quantization.keras.quantize_scope(custom_classes(model, quantize_configs)), \
            serialization_lib.SafeModeScope(safe_mode=False):
        yield


def custom_classes(model, quantize_configs=None) -> Dict[str, type]:
    """`{class name: class}` of the model's layers that are not tf_keras' own, and of the given
    QuantizeConfig objects: what tfmot's `quantize_apply` must find by name when it rebuilds
    the model from its config (tfmot's tutorial lists them in `quantize_scope` by hand).
    Classes these refer to in turn come from `collaborative_fit(custom_objects=...)`."""
    found = {}
    for layer in model.layers:
        cls = type(base_layer(layer))
        if not cls.__module__.startswith(("tf_keras.", "tensorflow_model_optimization.")):
            found[cls.__name__] = cls
    for config in (quantize_configs or {}).values():
        found[type(config).__name__] = type(config)
    return found


def _unsupported_without_config(model, planned, touched) -> List[str]:
    """The layers among `touched` tfmot's 8-bit scheme has no quantize config for, as far as
    can be told without quantizing: custom layer classes and Lambdas not given one."""
    configs = getattr(planned.phase, "quantize_configs", None) or {}
    custom = custom_classes(model)
    out = []
    for name in touched:
        layer = _find(model, name)
        if name not in configs and (isinstance(layer, tf_keras.layers.Lambda)
                                    or type(layer).__name__ in custom):
            out.append(f"'{name}' ({type(layer).__name__})")
    return out


def check_quantize_configs(model, planned, touched) -> None:
    """Raises ValueError unless every key of the phase's `quantize_configs` names a layer of
    `model` that the phase quantizes, and every value is a tfmot QuantizeConfig."""
    configs = getattr(planned.phase, "quantize_configs", None) or {}
    if not configs:
        return
    names = [base_name(l) for l in model.layers]
    given = f"Received: quantize_configs keys {sorted(configs)}"
    missing = sorted(set(configs) - set(names))
    if missing:
        raise ValueError(
            f"{planned.label}: quantize_configs names layer(s) {missing} that model "
            f"'{model.name}' does not have. Expected names from: {names}. Fix the keys of "
            f"Quantize(quantize_configs=...). {given}")
    left_out = sorted(n for n in configs if n not in touched
                      or isinstance(_find(model, n), tf_keras.layers.InputLayer))
    if left_out:
        raise ValueError(
            f"{planned.label}: layer(s) {left_out} have a quantize config but this phase does "
            "not quantize them (an Input layer, or left out by Quantize(layers=...)). Expected "
            "every configured layer to be quantized. Add them to `layers=`, or drop their "
            f"configs. {given}")
    wrong = {n: type(c).__name__ for n, c in configs.items()
             if not isinstance(c, tfmot.quantization.keras.QuantizeConfig)}
    if wrong:
        raise ValueError(
            f"{planned.label}: the quantize_configs of {sorted(wrong)} are not QuantizeConfig "
            f"objects ({wrong}). Expected instances of a subclass of "
            "tfmot.quantization.keras.QuantizeConfig. Pass e.g. quantize_configs="
            "{'layer': MyQuantizeConfig()} (see examples/custom_layer_qat.py).")


def _preserving(layer) -> bool:
    """Whether a QAT wrapper's kernel quantizer preserves sparsity or clusters."""
    return any(isinstance(q, (cpq.ClusterPreserveDefaultWeightsQuantizer,
                              ppq.PrunePreserveDefaultWeightsQuantizer))
               for _, q, _ in compat.weight_vars(layer))


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
        custom = _unsupported_without_config(model, planned, touched)
        raise ValueError(
            f"{planned.label}: tfmot cannot quantize model '{model.name}' as planned: "
            f"{type(e).__name__}: {e}. Expected layers tfmot's 8-bit scheme supports (Conv2D, "
            "Dense, DepthwiseConv2D, BatchNormalization after a convolution, ReLU, pooling, "
            "...) or that have a QuantizeConfig"
            + (f" (none for {', '.join(custom)})" if custom else "") + ". Give a custom layer "
            "or a Lambda its QuantizeConfig with Quantize(quantize_configs={'layer': "
            "MyQuantizeConfig()}) (see examples/custom_layer_qat.py; classes it refers to "
            "by name go in collaborative_fit(custom_objects={...})), leave layers out with "
            "Quantize(layers=[...]), or change them."
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
        for w, q, qvars in compat.weight_vars(layer):
            if isinstance(q, cpq.ClusterPreserveDefaultWeightsQuantizer) and not (
                    isinstance(qvars, dict) and cpq.CLUSTER_CENTROIDS in qvars):
                k = np.asarray(w.numpy())
                counts = stats.unique_values(k, axis=-1) if k.ndim > 1 else [
                    stats.unique_values(k)]
                lost[name] = (f"{stats.unique_values(k)} distinct values in the tensor, "
                              f"{min(counts)}-{max(counts)} per output channel")
    return lost


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
        for w, _, qvars in compat.weight_vars(layer) if isinstance(
                layer, quantize_wrapper.QuantizeWrapper) else []:
            if isinstance(qvars, dict) and cpq.CLUSTER_CENTROIDS in qvars:
                names.add(w.name)
    return names
