"""Reading what a wrapped model computes with, and what its wrappers promise."""

from __future__ import annotations

import numpy as np
from typing import Dict, List, Optional, Tuple

from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot.compat import (
    cluster_wrapper, cpq, ppq, pruning_wrapper, quantize_wrapper)
from keras_colopt.engines.tfmot.flatten import walk
from keras_colopt.engines.tfmot.layers import _KERNEL_ATTRS

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
        for w, quantizer, qvars in compat.weight_vars(layer):
            n = _short(w.name)
            if n not in _KERNEL_ATTRS:
                continue
            out.append((n, np.asarray(quantizer(w, False, weights=qvars)),
                        _channel_axis(layer.layer, n)))
        if out:
            return out
        # A wrapper that quantizes only the layer's output (tfmot wraps a layer that feeds an
        # annotated one so): its kernel is the float one it holds.
        layer = layer.layer
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
            step = int(layer.pruning_step.numpy()) if hasattr(layer, "pruning_step") else -1
            ready = target_reached(sched, step, target)
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
            for _, quantizer, qvars in compat.weight_vars(layer):
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


def target_reached(schedule, step: int, target: float) -> bool:
    """Whether the masks of a pruned layer at `step` (its `pruning_step`: the step of the
    last batch it trained) were last updated to `target`, whatever the schedule class.

    The wrapper counts its steps from 1 (it increments `pruning_step` before it asks the
    schedule), and updates a mask at the steps `begin_step + k * frequency` (>= 1) up to
    `end_step` (-1: no end), to the schedule's sparsity there: a `ConstantSparsity` holds its
    target from its first update (`ConstantSparsity(0.5, begin_step=0)`, tfmot's tutorials:
    step 100, its default frequency), a `PolynomialDecay` from its update at `end_step`.
    Here the schedule itself is asked at the last update step not after `step`.
    """
    import tensorflow as tf

    begin = int(getattr(schedule, "begin_step", 0))
    freq = max(1, int(getattr(schedule, "frequency", 1)))
    end = int(getattr(schedule, "end_step", -1))
    first = begin if begin >= 1 else begin + freq * -(-(1 - begin) // freq)
    last = step if end < 0 else min(step, end)
    if last < first:
        return False
    last = begin + ((last - begin) // freq) * freq
    should, sparsity = schedule(tf.constant(last, tf.int64))
    return bool(should) and float(sparsity) >= target - 1e-6


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
    return any(getattr(q, "per_axis", False) for _, q, _ in compat.weight_vars(layer))
