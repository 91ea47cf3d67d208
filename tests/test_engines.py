"""The engine boundary: only `engines/` imports tf_keras, tfmot or keras; every engine
implements the whole interface; `get_engine` asks each engine."""

import pathlib

import pytest

import keras_colopt
from keras_colopt.engines import base, engine_of, engines, get_engine

from test_layout import _imports as imports_of

PACKAGE = pathlib.Path(keras_colopt.__file__).parent
KERAS_FLAVOURS = ("tf_keras", "tensorflow_model_optimization", "keras")


def _imports(path):
    """Top-level package names a module imports (at any depth of its code)."""
    return {module.split(".")[0] for module in imports_of(path)}


def test_only_engines_import_a_keras_flavour():
    above = [p for p in PACKAGE.rglob("*.py") if "engines" not in p.relative_to(PACKAGE).parts]
    assert {p.name for p in above} >= {"fit.py", "callbacks.py", "checkpoint.py", "export.py",
                                        "tree.py", "report.py", "cli.py", "data.py"}
    found = {str(p.relative_to(PACKAGE)): sorted(set(_imports(p)) & set(KERAS_FLAVOURS))
             for p in above}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import tf_keras\n    from keras import layers\n")
    assert set(_imports(f)) == {"tf_keras", "keras"}


@pytest.mark.parametrize("engine", engines(), ids=lambda e: e.name)
def test_every_engine_implements_the_whole_interface(engine):
    missing = [n for n in base.REQUIRED if getattr(type(engine), n) is getattr(base.Engine, n)]
    assert missing == []
    for flag in ("supports_checkpoints", "supports_quantize_configs", "supports_drop_in"):
        assert isinstance(getattr(engine, flag), bool)


def test_the_base_engine_has_a_default_for_each_optional_method_only():
    """A method is optional exactly where the base does something sensible: each default runs
    without raising NotImplementedError, each required one raises it."""
    class Layer:
        name = "dense"

    class Model:
        name = "m"

    e = base.Engine()
    assert e.base_name(Layer()) == "dense"
    assert e.fold_plan(Model()) == ({}, {})
    model = Model()
    assert e.fold_activations(model, {}) is model
    assert e.unpreserved_clusters(model, ["dense"]) == {}
    with pytest.raises(TypeError, match="collaborative_fit"):
        e.switch_phase(model, None, 1, (), {})
    with pytest.raises(TypeError, match="switch_phase"):
        e.switch_optimizer(model, {})
    for name in base.REQUIRED:
        assert name not in base.DEFAULTS
    with pytest.raises(NotImplementedError):
        e.walk(model)


class _Marked:
    """A model of a flavour no built-in engine takes."""
    name = "marked"


def _marker_engine(name="marker"):
    class MarkerEngine(base.Engine):
        pass

    for method in base.REQUIRED:  # a stand-in for every required method
        setattr(MarkerEngine, method, lambda self, *a, **k: None)
    MarkerEngine.accepts = lambda self, model: isinstance(model, _Marked)
    MarkerEngine.name = name
    return MarkerEngine()


def test_a_registered_engine_is_asked_after_the_built_in_ones(monkeypatch):
    from keras_colopt import engines as registry

    monkeypatch.setattr(registry, "_REGISTERED", [])
    assert engine_of(_Marked()) is None
    mine = registry.register(_marker_engine())
    assert engine_of(_Marked()) is mine and get_engine(_Marked()) is mine
    assert engines()[-1] is mine and [e.name for e in engines()[:2]] == ["tfmot", "keras3"]
    with pytest.raises(ValueError, match="'marker' is registered already"):
        registry.register(_marker_engine())
    with pytest.raises(ValueError, match="'keras3' is registered already"):
        registry.register(_marker_engine("keras3"))


def test_register_refuses_what_is_not_a_whole_engine(monkeypatch):
    from keras_colopt import engines as registry

    monkeypatch.setattr(registry, "_REGISTERED", [])

    class Half(base.Engine):
        name = "half"

        def accepts(self, model):
            return False

    with pytest.raises(TypeError, match=r"does not implement the required method\(s\) \["):
        registry.register(Half())
    with pytest.raises(TypeError, match="takes an engine"):
        registry.register(object())
    assert registry._REGISTERED == []


def test_get_engine_asks_each_engine(seq_model):
    engine = get_engine(seq_model)
    assert engine is engine_of(seq_model) and engine.accepts(seq_model)
    assert engine_of(object()) is None
    with pytest.raises(TypeError, match="Expected a compiled tf_keras"):
        get_engine(object())


def test_library_callbacks_drive_a_keras3_fit_too():
    """The library's callbacks derive from the engine-neutral `Callback`: the same object is a
    valid callback for Keras 3's `fit` (what the Keras 3 engine will rely on)."""
    import numpy as np
    import keras as k3

    from keras_colopt.engines.base import Callback

    class Seen(Callback):
        def __init__(self):
            super().__init__()
            self.epochs = []

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(epoch)
            logs["seen/epoch"] = float(epoch)

    m = k3.Sequential([k3.Input((3,)), k3.layers.Dense(2)])
    m.compile("adam", "mse")
    cb = Seen()
    h = m.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=2, verbose=0, callbacks=[cb])
    assert cb.epochs == [0, 1] and h.history["seen/epoch"] == [0.0, 1.0]
