"""Engines apply phases to a model of one Keras flavour, behind one interface
(`keras_colopt.engines.base.Engine`). Only `engines/` imports tf_keras, tfmot or keras.

`get_engine(model)` asks each registered engine whether it accepts the model; the first that
does checks it and is returned. The library's two engines register themselves on first use;
`register(engine)` adds another. `default_engine()` is the engine of the library's own demo.
"""

from __future__ import annotations

from typing import List


def engines() -> List[object]:
    """The registered engines, in the order they are asked. The library's own are imported on
    first use (TF's import costs seconds) and asked first."""
    global _BUILT_IN
    if _BUILT_IN is None:
        from keras_colopt.engines.tfmot import TfmotEngine  # first: it resolves tf.keras
        from keras_colopt.engines.keras3 import Keras3Engine

        _BUILT_IN = [TfmotEngine(), Keras3Engine()]
    return _BUILT_IN + _REGISTERED


_BUILT_IN = None
_REGISTERED: List[object] = []


def register(engine) -> object:
    """Adds `engine` (an instance of a `base.Engine` subclass implementing `base.REQUIRED`)
    to the engines `get_engine` asks, after the library's own; returns it. Registering the
    same name twice is refused.

    Example:
        >>> colopt.engines.register(MyFlavourEngine())
    """
    from keras_colopt.engines.base import REQUIRED, Engine

    if not isinstance(engine, Engine):
        raise TypeError("register() takes an engine: an instance of a "
                        "keras_colopt.engines.base.Engine subclass. Received: "
                        f"{type(engine).__name__}")
    missing = [n for n in REQUIRED if getattr(type(engine), n) is getattr(Engine, n)]
    if missing:
        raise TypeError(f"Engine {engine.name!r} does not implement the required method(s) "
                        f"{missing}. Expected every method of base.REQUIRED.")
    if any(e.name == engine.name for e in engines()):
        raise ValueError(f"An engine named {engine.name!r} is registered already. Expected a "
                         "new name.")
    _REGISTERED.append(engine)
    return engine


def engine_of(model):
    """The engine that accepts `model`, or None (no check beyond its flavour)."""
    return next((e for e in engines() if e.accepts(model)), None)


def get_engine(model, compiled: bool = True):
    """Returns the engine able to handle `model`, or raises a clear error.

    Args:
        model: the user's model.
        compiled: also require the model to be compiled (what `collaborative_fit`
            needs; a callback does not).
    """
    engine = engine_of(model)
    if engine is None:
        # No engine takes this flavour: the first engine's check says why, and what to do.
        engines()[0].check_model(model, compiled=compiled)
        raise TypeError(f"No engine handles a model of type {type(model).__name__}.")
    engine.check_model(model, compiled=compiled)
    return engine


def _named(name: str):
    return next(e for e in engines() if e.name == name)


def default_engine():
    """The Keras 3 engine: the Keras people build with today."""
    return _named("keras3")


def load_model(path):
    """A compiled model from a file, loaded by the engine of its Keras flavour: a `.keras` file
    whose metadata says Keras 3 by the Keras 3 engine, anything else (tf_keras `.keras`,
    `.h5`, a SavedModel folder) by the tf_keras engine."""
    import json
    import os
    import zipfile

    name = None
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "metadata.json" in z.namelist():
                version = str(json.loads(z.read("metadata.json")).get("keras_version", ""))
                name = "keras3" if version.startswith("3.") else None
    return _named(name or "tfmot").load_model(path)
