"""Keras 3 models: checks, the recursive walk, copies, snapshots, compiling each phase."""

from __future__ import annotations

from typing import List, Optional, Tuple


from keras_colopt.engines import _flavour
from keras_colopt.engines.keras3 import compat, compress
from keras_colopt.engines.keras3._deps import keras
from keras_colopt.phases import CosineDecay


def is_model(obj) -> bool:
    return isinstance(obj, keras.Model)


def _is_graph(model) -> bool:
    return isinstance(model, (keras.Sequential, compat.functional_class()))


def check_model(model, compiled: bool = True) -> None:
    """Raises a clear error unless `model` is a built (compiled) Keras 3 Sequential or
    Functional model in float32."""
    if not is_model(model):
        raise TypeError("Expected a compiled Keras 3 (`import keras`) Sequential or Functional "
                        f"model. Received: model={model!r} of type {type(model).__name__}")
    if not _is_graph(model):
        raise TypeError(
            f"Model '{model.name}' is a subclassed keras.Model ({type(model).__name__}): its "
            "call() is Python code whose layers cannot be listed in order. Expected a "
            "Sequential or Functional model. Rebuild it with the Functional API "
            "(keras.Model(inputs, outputs)).")
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built. Expected a model with known input shapes. "
            "Start it with keras.Input(shape) (or call build()) first.")
    mixed = [n for n, l in walk(model)
             if getattr(getattr(l, "dtype_policy", None), "compute_dtype", "float32")
             not in ("float32", None)]
    if mixed:
        raise ValueError(
            f"Model '{model.name}' computes in half precision ({len(mixed)} layer(s), e.g. "
            f"{mixed[:3]}). Expected a float32 model: masks, centroids and the int8 export "
            "are float32. keras.config.set_dtype_policy('float32'), rebuild the model and "
            "copy its weights (model32.set_weights(model.get_weights())).")
    if compiled and (getattr(model, "optimizer", None) is None
                     or getattr(model, "loss", None) is None):
        raise ValueError(
            f"Model '{model.name}' is not compiled. Expected a model compiled with an "
            "optimizer and a loss: every phase re-compiles with the same loss and metrics "
            "and a fresh copy of your optimizer. Call model.compile(optimizer=..., loss=..., "
            "metrics=[...]) first.")


def walk(model, prefix: str = "") -> List[Tuple[str, object]]:
    """`[(path name, layer)]` of every layer, inside nested models at any depth; a container
    (`compress.CONTAINERS`: MultiHeadAttention) stands for its sublayers ('mha/query')."""
    out = []
    for layer in model.layers:
        name = prefix + layer.name
        inside = compress.sublayers(layer)  # [] for all but a container
        if isinstance(layer, keras.Model) and _is_graph(layer):
            out += walk(layer, name + "/")
        elif inside:
            out += [(name + "/" + n, s) for n, s in inside]
        else:
            out.append((name, layer))
    return out


def containers(model) -> list:
    """The containers (`compress.CONTAINERS`) of `model`, inside nested models too."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) and _is_graph(layer):
            out += containers(layer)
        elif compress.is_container(layer):
            out.append(layer)
    return out


def nested_models(model) -> List[str]:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) and _is_graph(layer):
            out.append(layer.name)
            out += [layer.name + "/" + n for n in nested_models(layer)]
    return out


def flatten_nested(model):
    """A copy of `model`: this engine compresses layers in place at any depth, so nested
    models need not be inlined (`walk` names their layers by path)."""
    return clone_model(model)


def clone_model(model):
    """A deep copy (new layers, same weights: masks and centroids too)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


snapshot = _flavour.snapshot


def rebuild(snap):
    return _flavour.rebuild(keras, snap)


@keras.saving.register_keras_serializable(package="keras_colopt")
class ContinuedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The user's compiled schedule read at the run's global step (`offset + step`): each
    phase's fresh optimizer counts from 0, the schedule runs on across phases."""

    def __init__(self, schedule, offset):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.offset = int(offset)

    def __call__(self, step):
        return self.schedule(step + self.offset)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "offset": self.offset}


def compile_config(model) -> dict:
    opt = model.optimizer
    lr = compat.optimizer_learning_rate(opt)
    if isinstance(lr, ContinuedSchedule):
        lr = lr.schedule
    schedule = lr if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) else None
    ocfg = opt.get_config()
    held = compat.compile_config(model)
    compile_cfg = dict(held.config) if held is not None else {}
    return {"optimizer_class": type(opt), "optimizer_config": {
                **ocfg, "learning_rate": float(keras.ops.convert_to_numpy(opt.learning_rate))
                if schedule is None else ocfg["learning_rate"]},
            "schedule": schedule, "compile": compile_cfg}


def _fresh(obj):
    return _flavour.fresh(keras, obj)


def fresh_optimizer(cfg: dict, learning_rate: Optional[float] = None, step_offset: int = 0):
    """A new optimizer like the compiled one: `learning_rate` if given, else the compiled
    rate, or the compiled schedule read from the run's global step `step_offset`."""
    ocfg = dict(cfg["optimizer_config"])
    if isinstance(learning_rate, CosineDecay):
        ocfg["learning_rate"] = keras.optimizers.schedules.CosineDecay(
            learning_rate.initial, learning_rate.steps)
    elif learning_rate is not None:
        ocfg["learning_rate"] = float(learning_rate)
    elif cfg.get("schedule") is not None:
        ocfg["learning_rate"] = ContinuedSchedule(cfg["schedule"], step_offset)
    return cfg["optimizer_class"].from_config(ocfg)


def compile_like(model, cfg: dict, learning_rate: Optional[float] = None,
                 step_offset: int = 0) -> None:
    args = {k: _fresh(v) for k, v in cfg["compile"].items() if k != "optimizer"}
    model.compile(optimizer=fresh_optimizer(cfg, learning_rate, step_offset), **args)
