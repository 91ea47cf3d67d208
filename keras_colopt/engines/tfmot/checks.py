"""Every phase checked against the model before any training."""

from __future__ import annotations

from typing import Dict, List

from keras_colopt.engines.tfmot.fold import fold_plan
from keras_colopt.engines.tfmot.layers import _find, _has_kernel, select_layers
from keras_colopt.engines.tfmot.quantize import check_quantize_configs, dry_run_quantize

def check_precision(model) -> None:
    """Refuses a mixed-precision model (a float16/bfloat16 compute dtype, or a
    LossScaleOptimizer), before any training.

    tfmot does not support it through the phases: its k-means++ centroid initialization
    fails on half-precision kernels after the earlier phases have trained, its QAT
    wrappers cannot be built, and a phase's own learning rate cannot be set on a
    LossScaleOptimizer rebuilt from its config.
    """
    mixed = [l.name for l in model.layers
             if getattr(getattr(l, "dtype_policy", None), "compute_dtype", "float32")
             not in ("float32", None)]
    scaled = type(getattr(model, "optimizer", None)).__name__.startswith("LossScaleOptimizer")
    if mixed or scaled:
        policy = model.layers[0].dtype_policy.name if model.layers else "?"
        raise ValueError(
            f"Model '{model.name}' uses mixed precision ({len(mixed)} layer(s) compute in half "
            f"precision, e.g. {mixed[:3]}; policy {policy!r}"
            + ("; optimizer LossScaleOptimizer" if scaled else "") + "), which the tfmot "
            "engine cannot prune, cluster or quantize (tfmot's clustering and QAT wrappers "
            "need float32 kernels and activations). Expected a float32 model. Rebuild it in "
            "float32 and copy the weights: tf_keras.mixed_precision.set_global_policy("
            "'float32'); model32 = tf_keras.models.clone_model(model); model32.set_weights("
            "model.get_weights()); compile it with a plain optimizer and pass model32. "
            f"Received: dtype policy {policy!r}")


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
    check_precision(model)
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
            check_quantize_configs(model, planned, touched)
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
            mine = sorted(set(lost) & set(getattr(planned.phase, "quantize_configs", None) or {}))
            if lost:
                raise ValueError(
                    f"{planned.label}: tfmot would quantize layer(s) {lost} without preserving "
                    "their sparsity/clusters (it gives them a quantize config of its own, e.g. "
                    "when it fuses them with the layer after them): the work of the earlier "
                    "phases would be lost silently. Expected every pruned/clustered layer to "
                    "keep a preserving weight quantizer. Exclude them from the Prune/Cluster "
                    "phases with layers=[...], or change the layer that follows them."
                    + (f" The QuantizeConfig given for {mine} in quantize_configs replaces "
                       "tfmot's preserving quantizer." if mine else ""))
    return skipped
