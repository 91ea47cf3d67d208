"""Folding standalone ReLU layers into the layer before them (tfmot's PQAT/CQAT/PCQAT need it)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot._deps import tf_keras
from keras_colopt.engines.tfmot.layers import _find, activation_after
from keras_colopt.engines.tfmot.quantize import _rebuilding
from keras_colopt.engines.tfmot.wrap import keep_output_names

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
        elif len(compat.outbound_nodes(w)) != 1 or len(compat.inbound_nodes(w)) != 1 \
                or len(compat.inbound_nodes(a)) != 1:
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
        with _rebuilding(model):
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
        with _rebuilding(model):
            new = tf_keras.Model.from_config(config)
    old = {l.name: l for l in model.layers}
    for layer in new.layers:
        layer.set_weights(old[layer.name].get_weights())
    return keep_output_names(new, model)
