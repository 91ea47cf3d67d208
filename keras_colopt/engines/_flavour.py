"""What tf_keras and Keras 3 do alike, given the flavour's `keras` module: the engines'
shared services (callbacks, History, copies, compile arguments) and the delegation of an
engine class to its package's functions. Imports no Keras itself."""

from __future__ import annotations

import os
import sys

import numpy as np

from keras_colopt.engines.base import INTERFACE, REQUIRED, Callback, Engine


def delegate(engine_class, module_name: str):
    """Makes every interface method of `engine_class` (except `accepts`) that module
    `module_name` has a function for call that function, looked up when called (so that a
    test can replace one with `monkeypatch.setattr(package, name, ...)`); a method with a
    default in `Engine` and no function there keeps the default. A required method with no
    function is an error here, at import, not at the first call."""
    def method_for(name):
        def method(self, *args, **kwargs):
            return getattr(sys.modules[module_name], name)(*args, **kwargs)
        method.__name__ = name
        method.__doc__ = getattr(Engine, name).__doc__
        return method

    module = sys.modules[module_name]
    missing = [n for n in REQUIRED if n != "accepts" and not hasattr(module, n)]
    if missing:
        raise TypeError(f"{engine_class.__name__}: module {module_name} has no function for "
                        f"the required engine method(s) {missing}.")
    for name in INTERFACE:
        if name != "accepts" and hasattr(module, name):
            setattr(engine_class, name, method_for(name))
    return engine_class


def check_callbacks(keras, callbacks, flavour: str, other: str) -> list:
    """The user's callbacks as a list; refuses a single callback and foreign objects
    (`flavour`: "tf_keras" or "Keras 3"; `other`: the flavour whose callbacks cannot
    drive this one's fit)."""
    def ok(cb):
        return isinstance(cb, (keras.callbacks.Callback, Callback))

    if callbacks is None:
        return []
    if ok(callbacks):
        raise ValueError("`callbacks` must be a list of callbacks, not a single one. Wrap it: "
                         f"callbacks=[{type(callbacks).__name__}(...)]")
    callbacks = list(callbacks)
    module = "tf_keras" if flavour == "tf_keras" else "keras"
    for i, cb in enumerate(callbacks):
        if not ok(cb):
            raise TypeError(
                f"callbacks[{i}] is a {type(cb).__module__}.{type(cb).__name__}, not a "
                f"{flavour} callback. Expected instances of {module}.callbacks.Callback (a "
                f"{other} callback object cannot drive a {flavour} model). Use the same "
                f"callback from `{module}.callbacks`.")
    return callbacks


def history(keras, model, epochs, values):
    h = keras.callbacks.History()
    h.set_model(model)
    h.epoch = list(epochs)
    h.history = dict(values)
    return h


def tensorboard_callback(keras, log_dir):
    return keras.callbacks.TensorBoard(log_dir=os.fspath(log_dir))


def snapshot(model):
    """What `rebuild` needs to copy an unwrapped model as it is now, however its layer
    objects change later: its class, config and weights (copies)."""
    return type(model), model.get_config(), [np.array(w) for w in model.get_weights()]


def rebuild(keras, snap):
    """A new model from a `snapshot`, with its weights."""
    cls, config, weights = snap
    model = (keras.Sequential if issubclass(cls, keras.Sequential)
             else keras.Model).from_config(config)
    model.set_weights(weights)
    return model


def fresh(keras, obj):
    """A new copy of each Metric/Loss object in a (nested) compile argument: metric state
    must not be shared between the models of two phases."""
    if isinstance(obj, (keras.metrics.Metric, keras.losses.Loss)):
        return type(obj).from_config(obj.get_config())
    if isinstance(obj, dict):
        return {k: fresh(keras, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(fresh(keras, v) for v in obj)
    return obj


def holds_kernels(layer) -> bool:
    """Whether `layer` holds trainable weights of rank 2 or more (kernels, embedding tables,
    an RNN cell's or an attention projection's kernels), in it or in the layers inside it."""
    return any(len(w.shape) >= 2 for w in layer.trainable_weights)


def chosen_layers(named, phase, model_name: str, default) -> list:
    """The names of the layers a phase's `layers=` selects among `named` (`[(name, layer)]`,
    in model order): `default(layer)` decides when it is None; a predicate that selects
    nothing, or a name the model lacks, is an error naming what exists."""
    sel = phase.layers
    if sel is None:
        return [n for n, l in named if default(l)]
    if callable(sel):
        chosen = [n for n, l in named if sel(l)]
        if not chosen:
            raise ValueError(
                f"{type(phase).__name__}: the `layers` predicate selected no layer of model "
                f"'{model_name}'. Expected it to return True for at least one of: "
                f"{sorted(n for n, _ in named)}. Received: layers={sel!r}")
        return chosen
    names = [n for n, _ in named]
    missing = [n for n in sel if n not in names]
    if missing:
        raise ValueError(
            f"{type(phase).__name__}: no layer named {missing} in model '{model_name}'. "
            f"Expected names from: {names} (a nested model's layers by path, "
            f"'backbone/conv1'). Fix the names in `layers=`. Received: layers={sel!r}")
    return list(sel)
