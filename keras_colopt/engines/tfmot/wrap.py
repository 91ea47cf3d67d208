"""Wrapping a model for one phase (prune, cluster, quantize) and stripping it again."""

from __future__ import annotations

import logging
import numpy as np
from typing import List

from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot._deps import tf, tf_keras, tfmot
from keras_colopt.engines.tfmot.compat import (
    cluster_wrapper, clustering_registry, pruning_wrapper, quantize_wrapper)
from keras_colopt.engines.tfmot.flatten import walk
from keras_colopt.engines.tfmot.layers import _INITS, _find, _has_kernel, base_layer, base_name, select_layers
from keras_colopt.engines.tfmot.quantize import _quantize

log = logging.getLogger("keras_colopt")

def pruning_schedule(phase, steps_per_epoch: int):
    """The tfmot schedule of a Prune phase for `steps_per_epoch` steps per epoch.

    The ramp is `phase.ramp(steps_per_epoch)`: it ends on a step where the mask is
    updated, so the target is reached exactly.

    Returns:
        (schedule, end_step): `end_step` is the pruning step after which the
        layer holds its target sparsity.
    """
    end_step, frequency = phase.ramp(steps_per_epoch)
    if phase.schedule == "constant" or phase.m_by_n is not None:
        return (tfmot.sparsity.keras.ConstantSparsity(
            phase.sparsity, begin_step=0, end_step=-1, frequency=frequency), frequency)
    return (tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=phase.initial_sparsity, final_sparsity=phase.sparsity,
        begin_step=0, end_step=end_step, frequency=frequency), end_step)


def strip(model):
    """Removes pruning and clustering wrappers (QAT wrappers stay: the converter reads them)."""
    stripped = model
    if any(isinstance(l, pruning_wrapper.PruneLowMagnitude) for _, l in walk(model)):
        model = tfmot.sparsity.keras.strip_pruning(model)
    if any(isinstance(l, cluster_wrapper.ClusterWeights) for _, l in walk(model)):
        model = tfmot.clustering.keras.strip_clustering(model)
    return model if stripped is model else keep_output_names(model, stripped)


def settle(model) -> None:
    """The raw variables set to what the wrappers compute with, in place: a pruned weight to
    `weight * mask` (the wrapper applies the mask before each step's forward pass, so the
    last step's update is left on masked weights), a clustering wrapper's original weights
    to their centroids (re-associated, as its call does). Neither changes what the model
    computes; `get_weights()` then shows the zeros and the shared values."""
    for _, layer in walk(model):
        if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
            for w, mask, _ in getattr(layer, "pruning_vars", []):
                w.assign(w * tf.cast(mask, w.dtype))
        elif isinstance(layer, cluster_wrapper.ClusterWeights):
            layer.update_clustered_weights_associations()
            for name, original in layer.original_clusterable_weights.items():
                original.assign(tf.convert_to_tensor(layer.get_weight_from_layer(name)))


def plain(model):
    """`model` without tfmot's wrappers: tf_keras' stock layers, the zeros and shared values
    in their kernels. A quantization-aware model comes back unwrapped (`_plain_qat`): each
    kernel as the int8 file holds it, dequantized."""
    from keras_colopt.engines.tfmot.read import is_qat

    if is_qat(model):
        return _plain_qat(model)
    return strip(model)


def _plain_qat(model):
    """A tfmot quantization-aware model as stock tf_keras layers: each QuantizeWrapper becomes
    a fresh copy of the layer it wraps (same class, config and name), whose kernel is what
    the wrapper's weight quantizer outputs (the values on the int8 grid the `.tflite` holds,
    dequantized; zeros and shared values kept) and whose other weights are the trained ones;
    tfmot's input QuantizeLayer is left out of a Sequential model and becomes an Identity
    layer in a functional one. The activations' ranges are gone: the float model computes
    like the QAT one up to the activations' rounding. Activation layers folded into the
    layer before them (for preserving QAT) stay folded."""
    from keras_colopt.engines.tfmot.compat import quantize_layer
    from keras_colopt.engines.tfmot.read import _short, kernels

    def copy(layer):
        if isinstance(layer, quantize_wrapper.QuantizeWrapper):
            layer = layer.layer
        elif isinstance(layer, quantize_layer.QuantizeLayer):
            return tf_keras.layers.Identity(name=layer.name)
        config = layer.get_config()
        act = config.get("activation")
        if isinstance(act, dict) and act.get("class_name") == "QuantizeAwareActivation":
            act = config["activation"] = act["config"]["activation"]  # tfmot's wrapper of it
        if isinstance(act, dict) and act.get("class_name") == "NoOpActivation":
            config["activation"] = "linear"  # a conv before its BatchNormalization
        return layer.__class__.from_config(config)

    if isinstance(model, tf_keras.Sequential):
        kept = [l for l in model.layers if not isinstance(l, quantize_layer.QuantizeLayer)]
        plain_model = tf_keras.Sequential([tf_keras.Input(model.input_shape[1:])]
                                          + [copy(l) for l in kept], name=model.name)
    else:
        kept = [l for l in model.layers if not isinstance(l, tf_keras.layers.InputLayer)]
        plain_model = tf_keras.models.clone_model(model, clone_function=copy)
    mine = [l for l in plain_model.layers if not isinstance(l, tf_keras.layers.InputLayer)]
    for wrapped, layer in zip(kept, mine):
        if isinstance(wrapped, quantize_wrapper.QuantizeWrapper):
            # By name: a CQAT/PCQAT kernel was moved to the non-trained list (its order).
            values = {_short(w.name): w.numpy() for w in wrapped.layer.weights}
            values.update({name: array for name, array, _ in kernels(wrapped)})
            layer.set_weights([values[_short(w.name)] for w in layer.weights])
        elif layer.weights:  # not the input quantizer's Identity, which holds none
            layer.set_weights(wrapped.get_weights())
    return plain_model


def keep_output_names(new, old):
    """Gives `new`, a re-wrapped copy of `old`, the output names of `old`; returns `new`.

    tf_keras names a Functional model's outputs after its output layers, and tfmot's
    wrappers rename those (`prune_low_magnitude_cls`, `quant_cls`): without this, a loss
    or metrics dict keyed by output name no longer compiles, and History's `cls_loss`
    becomes `prune_low_magnitude_cls_loss` after a phase switch. `compile` reads
    `output_names` (losses, metrics and their History names), and so does the `.tflite`
    converter (the signature's output names); they are plain strings, not checkpointed
    state. Outputs are matched by their base layer, or by position when a layer changed
    (an activation folded into the layer before it).
    """
    names = getattr(old, "output_names", None)
    if not names or not compat.is_graph_network(new):
        return new
    before = [base_name(l) for l in compat.output_layers(old)]
    after = [base_name(l) for l in compat.output_layers(new)]
    if len(set(before)) == len(before) == len(names) and sorted(after) == sorted(before):
        by_layer = dict(zip(before, names))
        _set_output_names(new, [by_layer[n] for n in after])
    elif len(after) == len(names):  # clone_model keeps the order of the outputs
        _set_output_names(new, names)
    return new


@tf.__internal__.tracking.no_automatic_dependency_tracking
def _set_output_names(model, names):
    # As tf_keras sets them: a plain list, not a tracked ListWrapper (no checkpoint entry).
    model.output_names = [str(n) for n in names]


def apply_phase(model, planned, steps_per_epoch: int, hold=()):
    """Wraps `model` for one planned phase.

    Args:
        model: the model as the previous phase left it (its wrappers are stripped).
        planned: the `PlannedPhase`.
        steps_per_epoch: training steps per epoch (lays out a pruning schedule).
        hold: names of layers that carry an earlier phase's work (zeros, clusters)
            that this phase does not touch: they are frozen (`trainable=False`)
            during it, so that training the others cannot undo that work.

    Returns:
        (new_model, companion_callbacks, touched_layer_names)
    """
    # Layers the user froze stay frozen: tfmot's QuantizeWrapperV2 would train their kernels.
    frozen = {base_name(l) for l in model.layers if not base_layer(l).trainable}
    new, companions, touched = _wrap_for_phase(model, planned, steps_per_epoch)
    hold = (set(hold) - set(touched)) | frozen
    if hold:
        for layer in new.layers:
            if base_name(layer) in hold:
                _freeze(layer)
    return new, companions, touched


def switch_phase(model, planned, steps_per_epoch: int, hold, cfg, learning_rate=None,
                 step_offset: int = 0):
    """Not possible with tfmot: its wrappers replace layers, so every phase needs a new model
    object (and a new fit()); `collaborative_fit` does that."""
    raise TypeError(
        f"Model '{model.name}' is a tf_keras model: tfmot compresses through wrapper layers "
        "that replace the model's layers, so phases cannot switch inside one model.fit. "
        "Expected a Keras 3 model for CollaborativeOptimization. Use "
        "colopt.collaborative_fit(model, x, y, phases=[...]) (one fit() per phase, one epoch "
        "axis), or build the model with Keras 3 (`import keras`).")


def _freeze(layer) -> None:
    """Makes a (possibly wrapped) layer's own weights non-trainable."""
    layer.trainable = False
    base_layer(layer).trainable = False
    if isinstance(layer, quantize_wrapper.QuantizeWrapper):
        # QuantizeWrapperV2 copies its inner layer's trainable weights into its own list
        # when built, so they would still train: move them to its non-trainable list.
        # In place: assigning a list of variables to a layer attribute makes tf_keras track
        # each trainable variable as a trainable weight again.
        # The kernel a QAT wrapper fake-quantizes is in its `_weight_vars`, no longer among
        # its inner layer's weights.
        inner = {id(w) for w in base_layer(layer).weights} | {
            id(w) for w, _, _ in compat.weight_vars(layer)}
        trained = compat.own_trainable_weights(layer)
        frozen = compat.own_non_trainable_weights(layer)
        moved = [w for w in trained if id(w) in inner]
        trained[:] = [w for w in trained if id(w) not in inner]
        known = {id(w) for w in frozen}
        frozen.extend(w for w in moved if id(w) not in known)


def _wrap_for_phase(model, planned, steps_per_epoch: int):
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
        new = keep_output_names(tf_keras.models.clone_model(model, clone_function=wrap), model)
        return new, [tfmot.sparsity.keras.UpdatePruningStep()], touched

    if kind == "cluster":
        kwargs = {"number_of_clusters": phase.clusters,
                  "cluster_centroids_init": _INITS[phase.init],
                  "preserve_sparsity": planned.preserve_sparsity,
                  "cluster_per_channel": phase.per_channel}

        def wrap(layer):
            if layer.name not in wanted:
                if _normalizes_by_batch(layer):
                    # As tfmot's cluster_weights(model) does: it wraps every layer, and its
                    # wrapper calls the layer without `training`, so a BatchNormalization
                    # normalizes with its moving statistics (gamma and beta still train) and
                    # the phase trains what the model computes at inference. Left in training
                    # mode, BN learnt on batch statistics that its moving ones (MobileNetV2:
                    # momentum 0.999) did not follow: right in training mode, wrong in
                    # inference (benchmarks/results/mobilenetv2_cluster_phase.md).
                    return cluster_wrapper.ClusterWeights(layer, **kwargs)
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
        new = keep_output_names(tf_keras.models.clone_model(model, clone_function=wrap), model)
        return new, [], touched

    if kind == "quantize":
        new = keep_output_names(_quantize(model, planned, wanted), model)
        return new, [], [n for n in touched if _has_kernel(_find(model, n))]
    raise AssertionError(kind)


def _normalizes_by_batch(layer) -> bool:
    """A BatchNormalization that tfmot's clustering wrapper accepts (no clusterable weights)."""
    return (isinstance(layer, tf_keras.layers.BatchNormalization)
            and clustering_registry.ClusteringRegistry.supports(layer))


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
