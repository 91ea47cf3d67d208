"""Models: checks, copies, snapshots, and compiling each phase like the user's model."""

from __future__ import annotations

from typing import Optional

from keras_colopt.engines import _flavour
from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot._deps import tf, tf_keras
from keras_colopt.phases import CosineDecay

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
    if not (isinstance(model, tf_keras.Sequential) or compat.is_graph_network(model)):
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
    try:
        clone = tf_keras.models.clone_model(model, clone_function=_same_name)
    except (TypeError, ValueError) as e:
        if "deserializ" not in str(e) and "Unknown" not in str(e):
            raise
        raise ValueError(
            f"Cannot copy model '{model.name}': a layer's config names a class or function "
            f"tf_keras does not know ({type(e).__name__}: {str(e)[:400]}). Expected every "
            "custom object its layers refer to to be known by name: every phase rebuilds "
            "layers from their configs. Pass them with collaborative_fit(custom_objects="
            "{'name': obj}), or register them with "
            "@tf_keras.saving.register_keras_serializable().") from e
    clone.set_weights(model.get_weights())
    return clone


def _same_name(layer):
    """A copy of `layer` from its config, under the layer's own name: a custom layer whose
    `get_config` leaves the name out (tf_keras' default for a subclass) would otherwise get a
    new one ('wrapped_1'), and `layers=` names, logs and results would stop matching the
    user's model."""
    config = layer.get_config()
    if "name" not in config:
        try:
            return layer.__class__.from_config({**config, "name": layer.name})
        except TypeError:  # a constructor without **kwargs
            pass
    return layer.__class__.from_config(config)


snapshot = _flavour.snapshot


def rebuild(snap):
    """A new model from a `snapshot`, with its weights."""
    return _flavour.rebuild(tf_keras, snap)


def _fresh(obj):
    return _flavour.fresh(tf_keras, obj)


@tf_keras.utils.register_keras_serializable(package="keras_colopt")
class ContinuedSchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
    """The user's compiled schedule, read at the run's global step.

    Each phase trains with a fresh optimizer, whose step counter starts at 0 (its
    moments are fresh too, so Adam's bias correction restarts with them). Evaluating
    the schedule at `offset + step`, where `offset` is the global step at which the
    phase starts, makes it run on across phases instead of restarting at its peak.

    Args:
        schedule: a `LearningRateSchedule` (not modified).
        offset: the run's global step at the phase's first step.
    """

    def __init__(self, schedule, offset):
        if isinstance(schedule, dict):
            schedule = tf_keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.offset = int(offset)

    def __call__(self, step):
        step = tf.convert_to_tensor(step)
        return self.schedule(step + tf.cast(self.offset, step.dtype))

    def get_config(self):
        return {"schedule": tf_keras.optimizers.schedules.serialize(self.schedule),
                "offset": self.offset}


def _compiled_schedule(opt):
    lr = compat.optimizer_learning_rate(opt)
    if lr is None:  # a legacy optimizer
        lr = compat.legacy_learning_rate(opt)
    if isinstance(lr, ContinuedSchedule):  # a model compiled by an earlier run: its offset
        lr = lr.schedule                     # is derived from the plan again
    return lr if isinstance(lr, tf_keras.optimizers.schedules.LearningRateSchedule) else None


def compile_config(model) -> dict:
    """What `model.compile` was given, in a form that can compile another model."""
    cl = model.compiled_loss
    cm = model.compiled_metrics
    opt = model.optimizer
    steps = compat.steps_per_execution(model)
    return {
        "optimizer_class": type(opt),
        "optimizer_config": opt.get_config(),
        "schedule": _compiled_schedule(opt),
        "loss": model.loss,
        "loss_weights": compat.user_loss_weights(cl),
        "metrics": compat.user_metrics(cm),
        "weighted_metrics": compat.user_weighted_metrics(cm),
        "run_eagerly": compat.run_eagerly_setting(model),
        "jit_compile": compat.jit_compile_setting(model),
        "steps_per_execution": int(steps.numpy()) if steps is not None else 1,
    }


def compile_like(model, cfg: dict, learning_rate: Optional[float] = None,
                 step_offset: int = 0) -> None:
    """Compiles `model` as the original was, with a fresh optimizer.

    Args:
        learning_rate: a constant rate for this phase, or `None` for the compiled one.
        step_offset: the run's global step at this phase's first step: a compiled
            schedule is read from there on (`ContinuedSchedule`), not from 0.
    """
    ocfg = dict(cfg["optimizer_config"])
    if isinstance(learning_rate, CosineDecay):
        ocfg["learning_rate"] = tf_keras.optimizers.schedules.CosineDecay(
            learning_rate.initial, learning_rate.steps)
    elif learning_rate is not None:
        ocfg["learning_rate"] = float(learning_rate)
    elif cfg.get("schedule") is not None:
        ocfg["learning_rate"] = ContinuedSchedule(cfg["schedule"], step_offset)
    optimizer = cfg["optimizer_class"].from_config(ocfg)
    model.compile(optimizer=optimizer, loss=_fresh(cfg["loss"]), loss_weights=cfg["loss_weights"],
                  metrics=_fresh(cfg["metrics"]), weighted_metrics=_fresh(cfg["weighted_metrics"]),
                  run_eagerly=cfg["run_eagerly"], steps_per_execution=cfg["steps_per_execution"],
                  jit_compile=cfg["jit_compile"])
