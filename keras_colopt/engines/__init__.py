"""Engines apply phases to a model of one Keras flavour.

Only `engines/` imports tfmot. An engine module provides:
  check_model(model), preflight(model, plan), apply_phase(model, planned,
  steps_per_epoch), strip(model), base_name(layer), kernels(layer),
  expectations(model), clone_model(model).
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
