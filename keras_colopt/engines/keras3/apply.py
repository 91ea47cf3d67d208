"""One phase on a Keras 3 model: which layers it selects, the checks before training,
applying it (in place, `compress`), stripping it, and reading what the layers compute."""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Tuple

import numpy as np

from keras_colopt.engines import _flavour
from keras_colopt.engines.keras3 import compress, quantize, runtime
from keras_colopt.engines.keras3._deps import keras
from keras_colopt.engines.keras3.models import clone_model, containers, fresh_optimizer, walk

log = logging.getLogger("keras_colopt")


def _has_kernel(layer) -> bool:
    return compress.supports(layer) or any(
        getattr(layer, a, None) is not None for a in ("kernel", "depthwise_kernel",
                                                      "pointwise_kernel", "embeddings"))


def can_touch(layer, kind: str) -> bool:
    return compress.supports(layer) and getattr(layer, "quantization_mode", None) is None


def _too_small(layer, phase) -> bool:
    size = int(np.prod(compress.raw_kernel(layer).shape))
    if phase.per_channel and compress.adapter(layer).per_channel:
        size //= compress.view_channels(layer)
    return size <= phase.clusters


def select_layers(model, phase, kind: str) -> Tuple[List[str], List[str]]:
    """(touched, skipped) path names; raises for a `layers=` name that is missing or that
    the phase cannot touch."""
    layers = walk(model)
    by_name = dict(layers)
    sel = phase.layers
    # By default every layer with a kernel, and any other layer holding kernels (rank >= 2
    # weights: MultiHeadAttention's EinsumDense projections, an LSTM's cell, a custom layer
    # with a Dense inside), so that one this engine cannot reach yet is named as skipped.
    chosen = _flavour.chosen_layers(
        layers, phase, model.name,
        lambda l: _has_kernel(l) or kind != "quantize" and _flavour.holds_kernels(l))

    def ok(name):
        layer = by_name[name]
        return can_touch(layer, kind) and not (kind == "cluster" and _too_small(layer, phase))

    touched = [n for n in chosen if ok(n)]
    skipped = [n for n in chosen if not ok(n) and by_name[n].weights]
    if sel is None:  # a nested subclassed model is one opaque layer: say so
        skipped += [n for n, l in layers if isinstance(l, keras.Model) and l.weights
                    and n not in chosen]
    refused = [n for n in chosen if not ok(n)]
    if sel is not None and not callable(sel) and refused:
        raise ValueError(
            f"{type(phase).__name__}: the Keras 3 engine cannot {kind} the layer(s) {refused} "
            f"you named (type {[type(by_name[n]).__name__ for n in refused]}). Expected "
            f"{compress.supported_names()} layers with more weights than clusters. "
            f"Remove them from `layers=`. Received: layers={sel!r}")
    return touched, skipped


def _layer_at(model, path: str):
    """The layer at a path name of `plan_ranges` ('backbone/conv'; a container by its own
    name, which `walk` replaces by its sublayers)."""
    for part in path.split("/"):
        model = model.get_layer(part)
    return model


def preflight(model, plan) -> Dict[str, List[str]]:
    """Every phase checked before any training: selections, and what this engine cannot do
    yet (quantization-aware training), refused with what to do instead."""
    skipped = {}
    by_name = dict(walk(model))  # (preflight changes nothing in the model)
    for planned in plan:
        kind = planned.phase.kind
        if kind == "train":
            continue
        if kind == "quantize":
            _, unknown = quantize.plan_ranges(model)
            if unknown:
                layers = {n: _layer_at(model, n.split(" (")[0]) for n in unknown
                          if "(keras.ops" not in n}
                kinds = (f" (type {sorted({type(l).__name__ for l in layers.values()})})"
                         if layers else "")
                known = sorted({c.__name__ for c in (*quantize.KNOWN, *quantize.CONTAINERS)}
                               - {"InputLayer"})
                raise ValueError(
                    f"{planned.label}: the Keras 3 engine does not know how LiteRT quantizes "
                    f"the layer(s) {unknown}{kinds}, so it cannot "
                    "train the model as the int8 file will run it. Expected "
                    f"{compress.supported_names(quantize=True)} and the layers "
                    f"{known}. Drop "
                    "the Quantize phase and export with post-training int8 (it calibrates "
                    "every layer and keeps the zeros and per-channel clusters): "
                    "colopt.export.to_tflite(result.model, path, quantization='int8', "
                    "representative_data=x[:256]).")
        touched, skip = select_layers(model, planned.phase, kind)
        skipped[planned.label] = skip
        for name in skip:
            layer = by_name.get(name)
            base = compress.base_class(type(layer))
            if base in compress.ADAPTERS and not compress.reads_kernel_property(layer):
                log.warning(
                    "%s: %s (%s) subclasses %s, but its call does not compute with `%s` (it "
                    "reads another variable, or could not be called alone on zeros), so "
                    "compressing that kernel would not change what it computes; it is left "
                    "as it is.", planned.label, name, type(layer).__name__, base.__name__,
                    compress.ADAPTERS[base].kernel)
        if not touched:
            raise ValueError(
                f"{planned.label}: no layer of model '{model.name}' can be {kind}d. Expected "
                f"at least one {compress.supported_names()} layer. Received: "
                f"layers={planned.phase.layers!r}")
        if kind == "prune" and planned.phase.m_by_n is not None:
            n = planned.phase.m_by_n[1]
            bad = [t for t in touched if int(compress.raw_kernel(by_name[t]).shape[
                compress.adapter(by_name[t]).input_axis]) % n]
            if bad:
                raise ValueError(
                    f"{planned.label}: m_by_n={planned.phase.m_by_n} groups {n} consecutive "
                    f"input weights, but layer(s) {bad} have an input size that {n} does not "
                    "divide. Expected input sizes that are multiples of n. Leave them out "
                    "with layers=[...].")
    return skipped


# --------------------------------------------------------------------------- phases

def strip(model):
    """A copy of `model` whose layers compute with their effective kernels baked in (and
    whose BatchNormalization layers normalize by batch again in training)."""
    if is_qat(model):  # its ranges and fake-quant are what the converter reads: kept
        copy = clone_model(model)
        for _, layer in walk(copy):
            compress.bake_for_export(layer)
        return copy
    if not any(compress.is_compressed(l) or isinstance(l, compress.MovingStatsBatchNormalization)
               for _, l in walk(model)):
        return model
    copy = clone_model(model)
    for _, layer in walk(copy):
        compress.bake(layer)
    _carry(copy)
    return copy


def _carry(model) -> None:
    """Each container's class as its sublayers now need (`compress.carry`)."""
    for container in containers(model):
        compress.carry(container)


def settle(model) -> None:
    """Each compressed layer's raw kernel set to the pruned/clustered kernel it computes with
    (`compress.settle`), in place."""
    for _, layer in walk(model):
        compress.settle(layer)


def plain(model):
    """A copy of `model` of stock Keras layers computing with its compressed kernels (see
    `compress.to_stock`)."""
    copy = clone_model(model)
    for _, layer in walk(copy):
        compress.to_stock(layer)
    for container in containers(copy):  # its own ranges (the attention's)
        compress.to_stock(container)
    _carry(copy)
    return copy


def apply_phase(model, planned, steps_per_epoch: int, hold=()):
    """Makes the selected layers of `model` (stripped) prunable or clusterable, in place;
    the `hold` layers and the layers the user froze stay frozen.

    Returns:
        (model, companion callbacks, touched): the schedules run in the graph; under a
        strategy with several replicas, a callback averages their moving statistics.
    """
    phase = planned.phase
    companions = runtime.replica_callbacks()
    if phase.kind == "train":
        return model, companions, []
    touched, _ = select_layers(model, phase, phase.kind)
    layers = dict(walk(model))
    if phase.kind == "prune":
        end_step, frequency = phase.ramp(steps_per_epoch)
        spec = compress.PruneSpec(sparsity=phase.sparsity,
                                  initial_sparsity=phase.initial_sparsity,
                                  schedule=phase.schedule, end_step=end_step,
                                  frequency=frequency, m_by_n=phase.m_by_n)
        for name in touched:
            compress.make_prunable(layers[name], spec)
    elif phase.kind == "cluster":
        rng = np.random.default_rng(0)
        # Preserving sparsity, zero is one of the `clusters` values (as in tfmot).
        k = phase.clusters - 1 if planned.preserve_sparsity else phase.clusters
        for name in touched:
            layer = layers[name]
            # Per output channel for convolutions; a Dense kernel per tensor (as in tfmot).
            per_channel = phase.per_channel and compress.adapter(layer).per_channel
            spec = compress.ClusterSpec(clusters=k, per_channel=per_channel,
                                        preserve_sparsity=planned.preserve_sparsity)
            view = compress.view(layer, np.asarray(compress.raw_kernel(layer).numpy()))
            c = compress.kernel_centroids(view, k, phase.init, rng, per_channel,
                                          skip_zeros=planned.preserve_sparsity)
            compress.make_clusterable(layer, spec, c)
        for _, layer in walk(model):
            compress.freeze_statistics(layer)
    elif phase.kind == "quantize":
        _apply_quantize(model, planned, touched, set(hold))
    else:
        raise AssertionError(phase.kind)
    for name in set(hold) - set(touched):
        layers[name].trainable = False
    _carry(model)
    return model, companions, touched


def _apply_quantize(model, planned, touched, held) -> None:
    """Quantization-aware training: the touched layers' kernels fake-quantized per output
    channel, keeping (with `preserve`) the zeros as a fixed mask and the clusters as trained
    centroids (the distinct values the Cluster phase left), so that at most N values per
    channel reach the int8 grid; every tensor LiteRT quantizes gets its range."""
    flags, _ = quantize.plan_ranges(model)
    layers = dict(walk(model))
    for name in touched:
        layer = layers[name]
        raw = np.asarray(compress.raw_kernel(layer).numpy())
        zeros = planned.preserve_sparsity and not np.all(raw)
        per_channel = planned.per_channel and compress.adapter(layer).per_channel
        c = _codebook(compress.view(layer, raw), per_channel, zeros,
                      planned.clusters) if planned.preserve_clusters and name in held else None
        if c is not None:  # (with the zeros' mask when preserving them)
            compress.make_clusterable(layer, compress.ClusterSpec(
                clusters=c.shape[-1], per_channel=per_channel, preserve_sparsity=zeros), c)
        elif zeros:
            compress.make_masked(layer)
    for name, (inputs, outputs, bias_apart) in flags.items():
        layer = layers[name] if name in layers else _layer_at(model, name)  # (a container)
        if compress.supports(layer):
            compress.make_quantized(layer, compress.QuantizeSpec(
                weights=name in touched, per_channel=True, inputs=inputs, outputs=outputs,
                bias_apart=bias_apart))
        elif inputs is not False or outputs or compress.is_container(layer) or isinstance(
                layer, keras.layers.BatchNormalization):
            quantize.observe(layer, inputs, outputs)
    for _, layer in walk(model):
        compress.freeze_statistics(layer)


def _codebook(view: np.ndarray, per_channel: bool, skip_zero: bool, limit):
    """The distinct values of a clustered kernel as centroids, `(k,)` or `(channels, k)`
    (a channel with fewer repeats its last); None for a kernel with more than `limit` (the
    Cluster phase's count, zero included): not clustered, e.g. only pruned."""
    def values(v):
        u = np.unique(v)
        return u[u != 0] if skip_zero else u
    groups = [values(view[:, j]) for j in range(view.shape[1])] if per_channel \
        else [values(view)]
    k = max(len(g) for g in groups)
    if k == 0 or limit is None or k > limit:
        return None
    padded = np.stack([np.pad(g, (0, k - len(g)), mode="edge") if len(g) else np.zeros(k)
                       for g in groups]).astype(np.float32)
    return padded if per_channel else padded[0]


def switch_phase(model, planned, steps_per_epoch: int, hold, cfg: dict, learning_rate=None,
                 step_offset: int = 0):
    """Switches the model to a phase in place, inside a running `fit()` (at an epoch's
    beginning): the previous phase's compression is baked into the kernels, the phase is
    applied, the model gets a fresh optimizer like the compiled one (the new variables, e.g.
    centroids, train from the next step), and its train/test/predict functions are traced
    again on the next call.

    Returns:
        The layers the phase touches.
    """
    for _, layer in walk(model):
        compress.bake(layer)
    _, _, touched = apply_phase(model, planned, steps_per_epoch, hold)
    switch_optimizer(model, cfg, learning_rate, step_offset)
    return touched


def switch_optimizer(model, cfg: dict, learning_rate=None, step_offset: int = 0) -> None:
    """Gives `model` a fresh optimizer like the compiled one (at `learning_rate`), inside a
    running `fit()`; its step functions are traced again on their next call."""
    optimizer = fresh_optimizer(cfg, learning_rate, step_offset)
    with compress.unlocked(model):
        model.optimizer = optimizer
    if keras.backend.backend() == "jax":  # its fit built the first optimizer before the loop
        optimizer.build(model.trainable_variables)
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    model.predict_function = None


def is_qat(model) -> bool:
    return any(_quantized(l) or quantize.is_observed(l) for _, l in walk(model))


def _quantized(layer):
    spec = getattr(layer, "_colopt_spec", None)
    return spec is not None and spec.quantize is not None


def quiet_expected_warnings(model):
    return contextlib.nullcontext()


def quantized_per_channel(layer) -> bool:
    return _quantized(layer) and layer._colopt_spec.quantize.weights \
        and layer._colopt_spec.quantize.per_channel


# --------------------------------------------------------------------------- reading

def kernels(layer):
    """`[(name, array, channel axis)]`: the kernel the layer computes with (masked, clustered),
    its output channels on one axis in the converted file's order (a DepthwiseConv2D's as
    `(kh, kw, channels)`; see `compress.Adapter.readable`)."""
    if not compress.supports(layer):
        return []
    w, axis = compress.adapter(layer).readable(compress.effective_numpy(layer))
    return [("kernel", w, axis)]


def expectations(model) -> Dict[str, dict]:
    """What each compressed layer promises now (see the tfmot engine's `expectations`)."""
    out = {}
    for name, layer in walk(model):
        if not compress.is_compressed(layer):
            continue
        spec = layer._colopt_spec
        if spec.prune is not None:  # promises its target (the mask is on its way there)
            p = spec.prune
            target = 1.0 - p.m_by_n[0] / p.m_by_n[1] if p.m_by_n else p.sparsity
            step = int(layer._colopt_step.numpy())
            ready = step >= (p.end_step if p.schedule == "polynomial" and not p.m_by_n else 1)
            out[name] = {"sparsity": target, "sparsity_ready": ready, "clusters": None,
                         "per_channel": False, "wrapper": "prune"}
            continue
        mask = layer._colopt_mask
        sp = None
        if mask is not None:
            m = np.asarray(mask.numpy())
            sp = float(np.count_nonzero(m == 0) / m.size)
        c = spec.cluster
        clusters = None if c is None else c.clusters + (1 if c.preserve_sparsity else 0)
        if spec.quantize is not None:
            if sp is not None or clusters is not None:
                out[name] = {"sparsity": sp, "sparsity_ready": True, "clusters": clusters,
                             "per_channel": c is not None and c.per_channel,
                             "wrapper": "quantize"}
        elif c is not None:
            out[name] = {"sparsity": sp, "sparsity_ready": True, "clusters": clusters,
                         "per_channel": c.per_channel, "wrapper": "cluster"}
    return out


def wrapper_kind(model) -> str:
    """"prune", "cluster", "QAT", "PQAT", "CQAT", "PCQAT" or "none" (as the tfmot engine)."""
    if is_qat(model):
        e = expectations(model).values()
        sp = any(v["sparsity"] is not None for v in e)
        cl = any(v["clusters"] is not None for v in e)
        return {(False, False): "QAT", (True, False): "PQAT", (False, True): "CQAT",
                (True, True): "PCQAT"}[(sp, cl)]
    kinds = set()
    for _, layer in walk(model):
        if compress.is_compressed(layer):
            spec = layer._colopt_spec
            kinds.add("cluster" if spec.cluster is not None else "prune")
    return "+".join(sorted(kinds)) or "none"
