"""Engines apply phases to a model of one Keras flavour.

Only `engines/` imports tfmot. What `fit`, `callbacks` and `export` call on an
engine module (a Keras 3 engine must provide the same):
  model checks and copies: check_model, clone_model, compile_config, compile_like;
  planning: preflight(model, plan), select_layers(model, phase, kind), fold_plan,
    fold_activations, can_touch;
  phases: apply_phase(model, planned, steps_per_epoch) -> (model, companions,
    touched layers), strip, is_qat, quiet_expected_warnings,
    unpreserved_clusters(model, names) (clustered layers a CQAT/PCQAT model dropped);
  reading: base_name(layer), kernels(layer) (the weights a layer computes with),
    expectations(model) (what its wrappers promise), quantized_per_channel,
    wrapper_kind;
  nested models: walk(model) -> [(path name, layer)] at any depth (`backbone/conv1`),
    nested_models(model), flatten_nested(model) (one Functional model, layers named by
    path, for collaborative_fit).
`get_engine(model)` picks the engine for a model.
"""

from __future__ import annotations


def get_engine(model, compiled: bool = True):
    """Returns the engine module able to handle `model`, or raises a clear error.

    Args:
        model: the user's model.
        compiled: also require the model to be compiled (what `collaborative_fit`
            needs; a callback does not).
    """
    from keras_colopt.engines import tfmot

    tfmot.check_model(model, compiled=compiled)
    return tfmot
