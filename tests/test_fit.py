"""collaborative_fit: every path of the deployment tree on a tiny model, the epoch axis,
and every refusal before training."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (  # noqa: E501
    cluster_preserve_quantize_registry as cpq)

import keras_colopt as colopt
from keras_colopt import Cluster, Prune, Quantize, Train, fit_inputs, stats
from keras_colopt.callbacks import layer_stats
from keras_colopt.engines import tfmot as engine
from keras_colopt.engines.tfmot import checks as engine_checks
from keras_colopt.engines.tfmot import quantize as engine_quantize

from conftest import Recorder, compile_, tiny_functional_relu, tiny_sequential
from test_checkpoint import Poison

TOL = 0.01
SPARSITY, CLUSTERS = 0.5, 4
WEIGHTED = ["conv", "hidden", "logits"]


def _fit(model, digits, phases, **kw):
    (x, y), (xt, yt) = digits
    kw.setdefault("batch_size", 64)
    return colopt.collaborative_fit(model, x, y, phases=phases, validation_data=(xt, yt),
                                    verbose=0, **kw)


def _tflite(model, tmp_path, digits, name="m.tflite"):
    (x, _), _ = digits
    info = colopt.export.to_tflite(model, tmp_path / name, quantization="int8",
                                   representative_data=x[:64])
    return {w.name: w for w in colopt.export.inspect_tflite(info.path)}


def _deployed(weights, layer):
    hits = [w for n, w in weights.items() if f"/{layer}/" in n or f"/quant_{layer}/" in n]
    assert len(hits) == 1, (layer, list(weights))
    return hits[0]


def _check(result, tmp_path, digits, sparsity=None, clusters=None, convs=("conv",)):
    """Asserts the invariants on the returned Keras model and in its int8 .tflite."""
    st = layer_stats(result.model)
    deployed = _tflite(result.model, tmp_path, digits)
    for layer in WEIGHTED:
        s, d = st[layer], _deployed(deployed, layer)
        assert d.dtype == "int8"
        if sparsity is not None:
            assert s.sparsity >= sparsity - TOL, (layer, s)
            assert d.sparsity >= sparsity - TOL, (layer, d)
        if clusters is not None:
            # Conv kernels are quantized per output channel: count per channel.
            keras_count = s.unique_per_channel_max if layer in convs else s.unique
            assert keras_count <= clusters, (layer, s)
            assert d.unique_per_channel_max <= clusters, (layer, d)
    return st, deployed


def test_sparsity_preserving_clustering(digits, tmp_path):
    r = _fit(tiny_sequential(), digits, [Train(epochs=1), Prune(sparsity=SPARSITY, epochs=2),
                                         Cluster(clusters=CLUSTERS, epochs=1)])
    assert [p.label for p in r.plan] == ["Train", "Prune", "Cluster (sparsity-preserving)"]
    _check(r, tmp_path, digits, sparsity=SPARSITY, clusters=CLUSTERS)


def test_pqat(digits, tmp_path):
    r = _fit(tiny_sequential(), digits, [Prune(sparsity=SPARSITY, epochs=2), Quantize(epochs=1)])
    assert r.plan.phases[-1].label == "PQAT" and engine.is_qat(r.model)
    _check(r, tmp_path, digits, sparsity=SPARSITY)


def test_qat_without_preservation_loses_sparsity(digits, tmp_path):
    """The negative control: plain QAT after pruning does not keep the zeros."""
    r = _fit(tiny_sequential(), digits,
             [Prune(sparsity=SPARSITY, epochs=2), Quantize(epochs=1, preserve="none")])
    st = layer_stats(r.model)
    assert st["hidden"].sparsity < SPARSITY - 0.2


def test_cqat(digits, tmp_path):
    r = _fit(tiny_sequential(), digits, [Cluster(clusters=CLUSTERS, epochs=1), Quantize(epochs=1)])
    assert r.plan.phases[-1].label == "CQAT"
    _check(r, tmp_path, digits, clusters=CLUSTERS)


def test_cqat_per_channel(digits, tmp_path):
    r = _fit(tiny_sequential(), digits,
             [Cluster(clusters=CLUSTERS, epochs=1, per_channel=True), Quantize(epochs=1)])
    st, deployed = _check(r, tmp_path, digits, clusters=CLUSTERS)
    # Per channel, the conv kernel as a whole holds more values than one channel may.
    assert st["conv"].unique > CLUSTERS
    assert _deployed(deployed, "conv").per_channel_quantized


def test_pcqat(digits, tmp_path):
    r = _fit(tiny_sequential(), digits, [Train(epochs=1), Prune(sparsity=SPARSITY, epochs=2),
                                         Cluster(clusters=CLUSTERS, epochs=1), Quantize(epochs=1)])
    assert r.plan.phases[-1].label == "PCQAT"
    _check(r, tmp_path, digits, sparsity=SPARSITY, clusters=CLUSTERS)


def test_qat_alone(digits, tmp_path):
    r = _fit(tiny_sequential(), digits, [Quantize(epochs=1)])
    assert r.plan.phases[-1].label == "QAT" and engine.is_qat(r.model)
    deployed = _tflite(r.model, tmp_path, digits)
    assert all(w.dtype == "int8" for w in deployed.values()) and len(deployed) == 3


def test_m_by_n_pruning(digits, tmp_path):
    r = _fit(tiny_sequential(), digits, [Prune(sparsity=0.5, epochs=1, m_by_n=(2, 4),
                                               layers=["hidden"])])
    k = [w for _, w, _ in engine.kernels(
        [l for l in r.model.layers if engine.base_name(l) == "hidden"][0])][0]
    # Along the input axis, every block of 4 consecutive weights keeps at most 2.
    blocks = (k.T.reshape(k.shape[1], -1, 4) != 0).sum(axis=-1)
    assert blocks.max() <= 2
    assert layer_stats(r.model)["conv"].sparsity == 0.0  # not selected: untouched


def test_layers_selection_touches_only_those(digits):
    r = _fit(tiny_sequential(), digits, [Prune(sparsity=SPARSITY, epochs=1, layers=["hidden"])])
    st = layer_stats(r.model)
    assert st["hidden"].sparsity >= SPARSITY - TOL
    assert st["conv"].sparsity == 0.0 and st["logits"].sparsity == 0.0


def test_one_epoch_axis_across_phases(digits, tmp_path):
    rec = Recorder()
    seen = {}

    class Kinds(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen[epoch] = engine.wrapper_kind(self.model)

    r = _fit(tiny_sequential(), digits,
             [Train(epochs=2), Prune(sparsity=SPARSITY, epochs=2),
              Cluster(clusters=CLUSTERS, epochs=1), Quantize(epochs=1)],
             callbacks=[rec, Kinds()], log_dir=tmp_path / "logs")
    assert rec.epochs == list(range(6))
    assert rec.train_begins == 4  # one fit() per phase
    assert seen == {0: "none", 1: "none", 2: "prune", 3: "prune", 4: "cluster", 5: "PCQAT"}
    assert [(p.start_epoch, p.end_epoch) for p in r.plan] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert r.history.epoch == list(range(6))
    assert r.history.history["phase"] == ["Train", "Train", "Prune", "Prune",
                                          "Cluster (sparsity-preserving)", "PCQAT"]
    assert len(r.history.history["loss"]) == 6 and len(r.history.history["val_accuracy"]) == 6
    # Only model-wide aggregates reach the logs the user's callbacks see.
    assert {"compression/sparsity", "compression/max_unique_weights"} <= set(rec.log_keys[-1])
    assert not any(k.startswith("sparsity/") for k in rec.log_keys[-1])
    assert r.history.history["compression/sparsity"][-1] >= SPARSITY - TOL


def test_user_model_is_not_modified(digits):
    model = tiny_sequential()
    before = [w.copy() for w in model.get_weights()]
    opt = model.optimizer
    r = _fit(model, digits, [Train(epochs=1), Prune(sparsity=SPARSITY, epochs=1)])
    assert r.model is not model
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.optimizer is opt and int(opt.iterations.numpy()) == 0
    assert [type(l).__name__ for l in model.layers] == ["Conv2D", "Flatten", "Dense", "Dense"]


def test_per_phase_learning_rate_and_fresh_optimizer(digits):
    rates = []

    class Rate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            rates.append((float(keras.backend.get_value(self.model.optimizer.learning_rate)),
                          int(self.model.optimizer.iterations.numpy()),
                          type(self.model.optimizer).__name__))

    _fit(tiny_sequential(), digits, [Train(epochs=1), Prune(sparsity=0.5, epochs=1,
                                                            learning_rate=1e-4)],
         callbacks=[Rate()])
    assert rates[0] == (pytest.approx(1e-2), 0, "Adam")
    assert rates[1] == (pytest.approx(1e-4), 0, "Adam")


def test_rate_policy_compiled_trains_every_phase_at_the_compiled_rate_unless_given_one(
        digits, caplog):
    """rate_policy="compiled": every phase trains at the compiled rate; an explicit rate
    wins; a compiled schedule is kept as it is (whatever the policy)."""
    rates = []

    class Rate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            rates.append(float(keras.backend.get_value(self.model.optimizer.learning_rate)))

    phases = [Train(epochs=1), Prune(sparsity=0.5, epochs=1), Cluster(clusters=4, epochs=1),
              Quantize(epochs=1)]
    with caplog.at_level(logging.INFO, logger="keras_colopt"):
        _fit(tiny_sequential(), digits, phases, callbacks=[Rate()], rate_policy="compiled")
    assert rates == pytest.approx([1e-2, 1e-2, 1e-2, 1e-2])
    assert any("PCQAT, epochs 3-3, learning rate 0.01 (as compiled: rate_policy='compiled')"
               in r.getMessage() for r in caplog.records)
    rates.clear()
    _fit(tiny_sequential(), digits, [Cluster(clusters=4, epochs=1, learning_rate=5e-3),
                                     Quantize(epochs=1, learning_rate=2e-2)], callbacks=[Rate()])
    assert rates == pytest.approx([5e-3, 2e-2])
    model = tiny_sequential()
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=model.loss)
    r = _fit(model, digits, [Quantize(epochs=1)])
    kept = r.model.optimizer.get_config()["learning_rate"]["config"]["schedule"]
    assert kept["class_name"] == "ExponentialDecay" and kept["config"]["initial_learning_rate"] == 1e-2


def test_a_compiled_schedule_runs_on_the_global_step_across_phases(digits):
    """A CosineDecay compiled by the user continues across phase switches (each phase has a
    fresh optimizer, whose own step restarts with its fresh moments); an explicit phase rate
    still wins, and the schedule resumes after it."""
    seen = []  # (phase index, optimizer step, rate the optimizer applies at that step)

    class Rate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.phase = len({p for p, _, _ in seen})

        def on_train_batch_end(self, batch, logs=None):
            # The rate the step just taken used (the optimizer keeps it per step).
            opt = self.model.optimizer
            seen.append((self.phase, int(opt.iterations.numpy()) - 1,
                         float(keras.backend.get_value(opt.learning_rate))))

    (x, _), _ = digits
    steps = int(np.ceil(len(x) / 64))
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=5 * steps)
    model = tiny_sequential()
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=model.loss)
    _fit(model, digits, [Train(epochs=1), Prune(sparsity=0.5, epochs=1),
                         Cluster(clusters=4, epochs=1, learning_rate=1e-4), Quantize(epochs=2)],
         callbacks=[Rate()])
    assert len(seen) == 5 * steps
    for g, (phase, step, rate) in enumerate(seen):
        expected = 1e-4 if phase == 2 else float(schedule(g))  # g: the run's global step
        assert rate == pytest.approx(expected, rel=1e-5), (g, phase, step)
    assert [step for p, step, _ in seen if step == 0] == [0] * 4  # a fresh optimizer per phase
    rates = [r for p, _, r in seen if p != 2]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # never back up to the peak


def test_dataset_input_and_companion_callbacks(digits):
    (x, y), _ = digits
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    r = colopt.collaborative_fit(tiny_sequential(), ds, phases=[Prune(sparsity=0.5, epochs=2)],
                                 verbose=0)
    # No UpdatePruningStep was given: the library added it (tfmot would raise without it).
    assert layer_stats(r.model)["hidden"].sparsity >= 0.5 - TOL


def test_standalone_activations_are_folded_so_pcqat_keeps_them(digits, tmp_path):
    model = tiny_functional_relu()
    xr = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    r = _fit(model, digits, [Prune(sparsity=SPARSITY, epochs=2),
                             Cluster(clusters=CLUSTERS, epochs=1), Quantize(epochs=1)])
    assert r.folded == {"conv": "conv_relu", "hidden": "hidden_relu"}
    _check(r, tmp_path, digits, sparsity=SPARSITY, clusters=CLUSTERS)
    # The user's model keeps its layers.
    assert "conv_relu" in [l.name for l in model.layers]
    assert model.predict(xr, verbose=0).shape == (4, 10)


def test_fold_activations_computes_the_same_function():
    model = tiny_functional_relu()
    pairs, unfoldable = engine.fold_plan(model)
    assert set(pairs) == {"conv", "hidden"} and not unfoldable
    folded = engine.fold_activations(model, pairs)
    assert "conv_relu" not in [l.name for l in folded.layers]
    x = np.random.default_rng(1).normal(size=(8, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_guard_catches_a_silent_tfmot_skip_when_not_folded(digits, monkeypatch):
    """InvariantGuard is the last line: without folding, tfmot's PCQAT skips the Conv2D
    followed by a standalone ReLU, and the guard must say so."""
    monkeypatch.setattr(engine, "fold_plan", lambda model: ({}, {}))
    monkeypatch.setattr(engine_checks, "dry_run_quantize", lambda *a: [])
    with pytest.raises(colopt.InvariantViolation) as info:
        _fit(tiny_functional_relu(), digits, [Prune(sparsity=SPARSITY, epochs=2),
                                              Cluster(clusters=CLUSTERS, epochs=1),
                                              Quantize(epochs=1)])
    msg = str(info.value)
    assert "layer 'conv'" in msg and "PCQAT" in msg and "epoch 3" in msg
    assert {v.layer for v in info.value.violations} >= {"conv"}


def test_dry_run_finds_a_silent_tfmot_skip_before_training(digits, monkeypatch):
    """Without folding, the dry run of the Quantize phase on a copy sees that tfmot would
    quantize 'conv' and 'hidden' without preservation, and refuses before any training."""
    monkeypatch.setattr(engine, "fold_plan", lambda model: ({}, {}))
    rec = Recorder()
    with pytest.raises(ValueError, match=r"layer\(s\) \['conv', 'hidden'\] without preserving"):
        _fit(tiny_functional_relu(), digits, [Prune(sparsity=SPARSITY, epochs=1),
                                              Quantize(epochs=1)], callbacks=[rec])
    assert rec.train_begins == 0


def test_conv_batchnorm_relu6_blocks_keep_pcqat(digits, tmp_path):
    """The MobileNet block (Conv2D -> BatchNorm -> ReLU6, DepthwiseConv2D): tfmot folds the
    BatchNorm and keeps preservation; DepthwiseConv2D is listed as untouched."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv")(i)
    h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(h))
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)
    h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(h))
    h = keras.layers.Conv2D(16, 1, use_bias=False, name="hidden")(h)
    h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(h))
    o = keras.layers.Dense(10, name="logits")(keras.layers.GlobalAveragePooling2D()(h))
    r = _fit(compile_(keras.Model(i, o)), digits, [Prune(sparsity=SPARSITY, epochs=2),
                                                  Cluster(clusters=CLUSTERS, epochs=1),
                                                  Quantize(epochs=1)])
    assert r.skipped["Prune"] == ["dw"]
    _check(r, tmp_path, digits, sparsity=SPARSITY, clusters=CLUSTERS, convs=("conv", "hidden"))


def test_unsupported_layers_are_listed_not_skipped_silently(digits, caplog):
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([
        keras.layers.DepthwiseConv2D(3, name="dw", input_shape=(8, 8, 1)),
        keras.layers.Flatten(), keras.layers.Dense(10, name="logits")]))
    with caplog.at_level("INFO", logger="keras_colopt"):
        r = _fit(model, digits, [Prune(sparsity=SPARSITY, epochs=1)])
    assert r.skipped["Prune"] == ["dw"]
    assert sum("dw" in rec.getMessage() and "cannot touch" in rec.getMessage()
               for rec in caplog.records) == 1


# ------------------------------------------------------------------ refusals before training

class _Sub(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = keras.layers.Dense(10)

    def call(self, x):
        return self.d(keras.layers.Flatten()(x))


def _subclassed():
    m = _Sub()
    m(np.zeros((1, 8, 8, 1), "float32"))
    return compile_(m)


def _uncompiled():
    return keras.Sequential([keras.layers.Flatten(input_shape=(8, 8, 1)),
                             keras.layers.Dense(10)])


def _unfoldable_relu():
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="conv")(i)
    h = keras.layers.ReLU(threshold=0.5, name="odd_relu")(h)
    o = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(h))
    return compile_(keras.Model(i, o))


def _mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return tiny_sequential()
    finally:
        keras.mixed_precision.set_global_policy("float32")


REFUSALS = [
    ("mixed precision", _mixed_precision, [Train(epochs=1), Prune(sparsity=0.5, epochs=1),
                                           Cluster(clusters=4, epochs=1)], {}, ValueError,
     "uses mixed precision"),
    ("prune after cluster", None, [Cluster(clusters=8, epochs=1), Prune(sparsity=0.5, epochs=1)],
     {}, colopt.PlanError, "scatter the clusters"),
    ("two quantize", None, [Quantize(epochs=1), Quantize(epochs=1)], {}, colopt.PlanError,
     "repeats"),
    ("after quantize", None, [Quantize(epochs=1), Train(epochs=1)], {}, colopt.PlanError,
     "comes after phases[0] Quantize"),
    ("few clusters", None, [Prune(sparsity=0.5, epochs=1), Cluster(clusters=2, epochs=1)], {},
     colopt.PlanError, "clusters >= 3"),
    ("subclassed", _subclassed, [Train(epochs=1)], {}, TypeError, "subclassed"),
    ("uncompiled", _uncompiled, [Train(epochs=1)], {}, ValueError, "not compiled"),
    ("unknown layer", None, [Prune(sparsity=0.5, epochs=1, layers=["nope"])], {}, ValueError,
     "no layer named ['nope']"),
    ("unprunable named layer", None, [Prune(sparsity=0.5, epochs=1, layers=["flat"])], {},
     ValueError, "cannot prune"),
    ("epochs kwarg", None, [Train(epochs=1)], {"epochs": 3}, ValueError, "give each phase"),
    ("unknown kwarg", None, [Train(epochs=1)], {"epoch": 3}, TypeError, "unknown keyword"),
    ("keras 3 callback", None, [Train(epochs=1)], {"callbacks": "k3"}, TypeError,
     "not a tf_keras callback"),
    ("unfoldable activation", _unfoldable_relu,
     [Prune(sparsity=0.5, epochs=1), Quantize(epochs=1)], {}, ValueError, "standalone activation"),
    ("no prunable layer", lambda: compile_(keras.Sequential([
        keras.layers.DepthwiseConv2D(3, input_shape=(8, 8, 1)), keras.layers.Flatten()])),
     [Prune(sparsity=0.5, epochs=1)], {}, ValueError, "no layer this phase can prune"),
    ("infinite dataset", None, [Train(epochs=1)], {"x": "repeat"}, ValueError,
     "steps_per_epoch"),
    ("empty dataset", None, [Train(epochs=1)], {"x": "empty"}, ValueError, "empty"),
]


@pytest.mark.parametrize("name,make,phases,kw,exc,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_before_any_training(digits, tmp_path, name, make, phases, kw, exc, words):
    (x, y), _ = digits
    model = (make or tiny_sequential)()
    before = [w.copy() for w in model.get_weights()]
    rec = Recorder()
    kw = dict(kw)
    cbs = [rec]
    if kw.pop("callbacks", None) == "k3":
        import keras as k3
        cbs.append(k3.callbacks.History())
    data_x, data_y = x, y
    special = kw.pop("x", None)
    if special == "repeat":
        data_x, data_y = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat(), None
    elif special == "empty":
        data_x, data_y = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(32), None
    log_dir = tmp_path / "logs"
    with pytest.raises(exc) as info:
        colopt.collaborative_fit(model, data_x, data_y, phases=phases, callbacks=cbs,
                                 log_dir=log_dir, verbose=0, **kw)
    assert words in str(info.value)
    assert rec.train_begins == 0
    assert not log_dir.exists()
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_expected_gradient_warning_is_hidden_only_for_cqat_kernels(digits, caplog):
    with caplog.at_level("WARNING", logger="tensorflow"):
        r = _fit(tiny_sequential(), digits, [Cluster(clusters=CLUSTERS, epochs=1),
                                             Quantize(epochs=1)])
    assert not [m for m in caplog.messages if "Gradients do not exist" in m]
    names = engine.gradless_by_design(r.model)
    assert names == {"conv/kernel:0", "hidden/kernel:0", "logits/kernel:0"}
    # Any other variable still warns.
    keep = engine.expected_gradient_warning(names)
    rec = lambda listed: logging.LogRecord(  # noqa: E731
        "tensorflow", logging.WARNING, "", 0,
        "Gradients do not exist for variables %s when minimizing the loss.", (listed,), None)
    assert not keep(rec(["conv/kernel:0"]))
    assert keep(rec(["conv/kernel:0", "conv/bias:0"]))


def test_per_channel_clustering_of_a_conv_without_bias(digits, tmp_path):
    """tfmot's cluster_weights silently skips a per-channel Conv2D with use_bias=False."""
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([
        keras.layers.Conv2D(8, 3, use_bias=False, activation="relu", name="conv",
                            input_shape=(8, 8, 1)),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits")]))
    r = _fit(model, digits, [Cluster(clusters=CLUSTERS, epochs=1, per_channel=True),
                             Quantize(epochs=1)])
    _check(r, tmp_path, digits, clusters=CLUSTERS)
    assert layer_stats(r.model)["conv"].unique > CLUSTERS  # per channel, not per tensor


def test_kernels_too_small_to_cluster_are_listed(digits):
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([
        keras.layers.Conv2D(8, 1, name="pointwise", input_shape=(8, 8, 1)),  # 1 weight/channel
        keras.layers.Flatten(), keras.layers.Dense(10, name="logits")]))
    r = _fit(model, digits, [Cluster(clusters=CLUSTERS, epochs=1, per_channel=True)])
    assert r.skipped["Cluster per channel"] == ["pointwise"]
    assert layer_stats(r.model)["logits"].unique <= CLUSTERS
    with pytest.raises(ValueError, match=r"cannot cluster the layer\(s\) \['pointwise'\]"):
        _fit(model, digits, [Cluster(clusters=CLUSTERS, epochs=1, per_channel=True,
                                     layers=["pointwise"])])


def test_quantize_only_selected_layers(digits, tmp_path):
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

    r = _fit(tiny_sequential(), digits, [Quantize(epochs=1, layers=["hidden"])])
    wrapped = {engine.base_name(l) for l in r.model.layers
               if isinstance(l, quantize_wrapper.QuantizeWrapper)}
    assert "hidden" in wrapped and not {"conv", "logits"} & wrapped
    deployed = _tflite(r.model, tmp_path, digits)
    assert _deployed(deployed, "hidden").dtype == "int8"


def test_compile_settings_carry_over_to_every_phase(digits):
    keras.utils.set_random_seed(0)
    model = tiny_sequential()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
                  weighted_metrics=[keras.metrics.SparseCategoricalCrossentropy(
                      from_logits=True, name="wxe")])
    seen = []

    class Opt(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(self.model.optimizer.get_config())

    r = _fit(model, digits, [Train(epochs=1), Prune(sparsity=0.5, epochs=1),
                             Quantize(epochs=1)], callbacks=[Opt()])
    for key in ("acc", "val_acc", "wxe", "val_wxe"):
        assert not np.isnan(r.history.history[key]).any(), key
    assert [c["name"] for c in seen] == ["SGD"] * 3
    assert all(c["momentum"] == 0.5 for c in seen)


def test_fit_arguments_pass_through(digits):
    (x, y), _ = digits
    seen = []

    class Params(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(self.params["steps"])

    # 512 samples, 25% held out, batch 64: ceil(384 / 64) = 6 steps per epoch.
    r = colopt.collaborative_fit(
        tiny_sequential(), x, y, phases=[Train(epochs=1), Prune(sparsity=0.5, epochs=1)],
        batch_size=64, validation_split=0.25, class_weight={i: 1.0 + i for i in range(10)},
        shuffle=False, callbacks=[Params()], verbose=0)
    assert seen == [6, 6]
    assert fit_inputs.steps_per_epoch_of(x, 64, None, 0.25) == 6
    assert len(r.history.history["val_loss"]) == 2
    assert layer_stats(r.model)["hidden"].sparsity >= 0.5 - TOL


def test_initial_phase_continues_a_stripped_earlier_run(digits, tmp_path):
    """A run can go on from the stripped result of an earlier one: later phases still
    preserve the earlier work (PCQAT, guarded) and the epoch axis continues."""
    phases = [Train(epochs=1), Prune(sparsity=SPARSITY, epochs=2),
              Cluster(clusters=CLUSTERS, epochs=1), Quantize(epochs=1)]
    first = _fit(tiny_sequential(), digits, phases[:2])
    pruned = engine.strip(first.model)
    engine.compile_like(pruned, engine.compile_config(tiny_sequential()))
    rec = Recorder()
    r = _fit(pruned, digits, phases, initial_phase=2, callbacks=[rec])
    assert rec.epochs == [3, 4] and r.history.epoch == [3, 4]
    assert r.history.history["phase"] == ["Cluster (sparsity-preserving)", "PCQAT"]
    assert engine.wrapper_kind(r.model) == "PCQAT"
    _check(r, tmp_path, digits, sparsity=SPARSITY, clusters=CLUSTERS)


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True, "1"])
def test_initial_phase_out_of_range_is_refused(digits, bad):
    with pytest.raises(ValueError, match=r"`initial_phase` must be.*\[0, 3\]"):
        _fit(tiny_sequential(), digits, [Train(epochs=1), Prune(epochs=1), Cluster(epochs=1),
                                         Quantize(epochs=1)], initial_phase=bad)


def _clustered_conv_model(channels, values_per_channel, short_channels=(), seed=0):
    """Input 8x8x1 -> Conv2D(channels, 3) whose kernel already holds `values_per_channel`
    distinct values in each output channel (2 in `short_channels`), different in every
    channel -> Dense: what per-channel clustering leaves."""
    keras.utils.set_random_seed(seed)
    model = compile_(keras.Sequential([
        keras.layers.Conv2D(channels, 3, activation="relu", name="conv", input_shape=(8, 8, 1)),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(10, name="logits")], name="clustered_conv"))
    rng = np.random.default_rng(seed)
    k = np.empty((3, 3, 1, channels), np.float32)
    for c in range(channels):
        n = 2 if c in short_channels else values_per_channel
        centroids = rng.normal(0, 0.2, n).astype(np.float32)
        k[..., c] = centroids[np.arange(9).reshape(3, 3, 1) % n]
    model.get_layer("conv").kernel.assign(k)
    return model


def test_per_channel_cqat_keeps_channels_holding_fewer_clusters(digits, tmp_path, monkeypatch):
    """tfmot's CQAT reads per-channel centroids only when every channel holds the same number
    of values (+-1); otherwise it takes the tensor's values, and past 1,024 of them it
    quantizes the layer without its clusters ("No clustering performed"), silently. Found on
    MobileNet's pointwise convs. The engine keeps each channel's own centroids."""
    phases = [Cluster(clusters=8, epochs=1, per_channel=True, layers=["conv"]),
              Quantize(epochs=2)]
    model = _clustered_conv_model(150, 8, short_channels=(0, 1, 2))  # 8 x 147 + 6 > 1,024
    before = [w.copy() for w in model.get_weights()]
    r = _fit(model, digits, phases, initial_phase=1)
    (_, k, axis), = engine.kernels(r.model.get_layer("quant_conv"))
    per_channel = stats.unique_values(k, axis=axis)
    assert per_channel.max() <= 8  # the short channels may take up spare centroids, up to 8
    d = _deployed(_tflite(r.model, tmp_path, digits), "conv")
    assert d.unique_per_channel_max <= 8
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))

    # Without the engine's centroids, tfmot drops the layer's clusters: refused at the start
    # of the Quantize phase, before it trains, naming the layer and why.
    monkeypatch.setattr(engine_quantize, "_clustered_centroids",
                        lambda planned: cpq.get_centroids)
    rec = Recorder()
    with pytest.raises(ValueError, match=r"CQAT.*\['conv'\] without their clusters.*"
                                         r"'conv': \d{4} distinct values in the tensor, 2-8 "
                                         r"per output channel"):
        _fit(_clustered_conv_model(150, 8, short_channels=(0, 1, 2)), digits, phases,
             initial_phase=1, callbacks=[rec])
    assert rec.epochs == []


def test_per_tensor_cqat_keeps_the_tensors_shared_centroids(digits):
    """A per-tensor clustered Conv2D whose channels each hold all its values: tfmot's CQAT
    would give every channel its own copy of the centroids, which then drift apart (up to
    clusters x channels values in the tensor). The engine keeps one set for the tensor."""
    model = _clustered_conv_model(8, 4)
    shared = np.array([-0.3, -0.1, 0.1, 0.3], np.float32)
    per_channel = shared[np.arange(9) % 4].reshape(3, 3, 1, 1)
    model.get_layer("conv").kernel.assign(np.repeat(per_channel, 8, axis=-1))
    r = _fit(model, digits, [Cluster(clusters=4, epochs=1, layers=["conv"]), Quantize(epochs=2)],
             initial_phase=1)
    wrapper = r.model.get_layer("quant_conv")
    (kernel, centroids), = [(w, v[cpq.CLUSTER_CENTROIDS]) for w, _, v in wrapper._weight_vars
                            if isinstance(v, dict) and cpq.CLUSTER_CENTROIDS in v]
    assert centroids.shape == (4,)
    float_kernel = kernel.numpy()  # what the centroids wrote, before fake quantization
    assert np.unique(float_kernel).size <= 4
    assert not np.allclose(np.sort(np.unique(float_kernel)), shared)  # it trained



@pytest.mark.parametrize("later", [
    Quantize(epochs=2, layers=["logits"]),
    Cluster(clusters=CLUSTERS, epochs=2, layers=["logits"]),
], ids=["quantize", "cluster"])
def test_a_later_phase_restricted_with_layers_keeps_the_others_compression(
        digits, tmp_path, later, caplog):
    """Prune everything, then a phase that selects one layer: the other pruned layers keep
    their zeros (held fixed, said in the log), in Keras and in the .tflite; the guard checks
    them too."""
    with caplog.at_level(logging.INFO, logger="keras_colopt"):
        r = _fit(tiny_sequential(), digits, [Prune(sparsity=SPARSITY, epochs=2), later])
    st = layer_stats(r.model)
    deployed = _tflite(r.model, tmp_path, digits)
    for layer in WEIGHTED:
        assert st[layer].sparsity >= SPARSITY - TOL, (layer, st[layer])
        assert _deployed(deployed, layer).sparsity >= SPARSITY - TOL, layer
    assert any("does not touch layer(s) conv, hidden" in m and "frozen" in m
               for m in caplog.messages), caplog.messages


def test_held_layers_are_checked_by_the_guard(digits, monkeypatch):
    """If holding a layer fixed failed, the guard would say so: here the engine is made to
    ignore `hold`, and the zeros of the held layers are lost during the Cluster phase."""
    _ignore_hold(monkeypatch)
    with pytest.raises(colopt.InvariantViolation) as info:
        _fit(tiny_sequential(), digits, [Prune(sparsity=SPARSITY, epochs=2),
                                         Cluster(clusters=CLUSTERS, epochs=2,
                                                 layers=["logits"])])
    assert {v.layer for v in info.value.violations} <= {"conv", "hidden"}
    assert {v.invariant for v in info.value.violations} == {"sparsity"}


# ------------------------------------------------------------------ errors after training

class _Weights(keras.callbacks.Callback):
    """The weights of the training model at every epoch end (as the user's callback sees it)."""

    def __init__(self):
        super().__init__()
        self.at = {}

    def on_epoch_end(self, epoch, logs=None):
        self.at[epoch] = _kernels(self.model)


def _kernels(model):
    """{layer: kernel} as the layer computes with it (wrapped or not)."""
    from keras_colopt.callbacks import effective_kernels

    return {name: ks[0][1] for name, ks in effective_kernels(model).items()}


class _Boom(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("a user callback failed")


def _ignore_hold(monkeypatch):
    real = engine.apply_phase
    monkeypatch.setattr(engine, "apply_phase", lambda m, p, s, hold=(): real(m, p, s, hold=()))


@pytest.mark.parametrize("case,exc,good", [
    ("diverged", colopt.TrainingDiverged, 1),
    ("user callback", RuntimeError, 1),
    ("violation", colopt.InvariantViolation, 1),
    ("user callback, second epoch of the phase", RuntimeError, 2),
])
def test_an_error_after_training_hands_back_the_last_good_model(
        digits, monkeypatch, case, exc, good):
    phases = [Train(epochs=1), Prune(sparsity=SPARSITY, epochs=1),
              Cluster(clusters=CLUSTERS, epochs=2, layers=["logits"])]
    weights = _Weights()
    extra = {"diverged": [Poison(2)], "user callback": [_Boom(2)], "violation": [],
             "user callback, second epoch of the phase": [_Boom(3)]}[case]
    if case == "violation":
        _ignore_hold(monkeypatch)  # the held layers lose their zeros in epoch 2
    with pytest.raises(exc) as info:
        _fit(tiny_sequential(), digits, phases, callbacks=[weights] + extra)
    e = info.value
    assert e.result.history.epoch == list(range(good + 1))
    assert e.result.history.history["phase"] == ["Train", "Prune", "Cluster (sparsity-"
                                                 "preserving)"][:good + 1]
    assert e.result.stopped_early == "Cluster (sparsity-preserving)"
    handed = _kernels(e.result.model)
    assert sorted(handed) == sorted(weights.at[good]) == WEIGHTED
    for name, kernel in handed.items():
        np.testing.assert_array_equal(kernel, weights.at[good][name])
    assert all(np.isfinite(w).all() for w in e.result.model.get_weights())
    assert e.checkpoint_dir is None
    notes = "\n".join(getattr(e, "__notes__", []))
    assert f"The last good model (after epoch {good}, " \
           f"{e.result.history.history['phase'][-1]}) is handed back" in notes
    if good == 2:  # within the phase: its own (wrapped) model, restored
        assert e.result.model is weights.model


def test_a_refusal_after_training_names_the_checkpoint_and_hands_back(digits, tmp_path,
                                                                      monkeypatch):
    """The CQAT lost-clusters refusal comes at the start of the Quantize phase, after the
    Cluster phase trained: the error carries that model, and the checkpoint folder."""
    monkeypatch.setattr(engine, "unpreserved_clusters",
                        lambda model, names: {n: "refused for the test" for n in names})
    with pytest.raises(ValueError, match="without their clusters") as info:
        _fit(tiny_sequential(), digits, [Cluster(clusters=CLUSTERS, epochs=2), Quantize(epochs=1)],
             checkpoint_dir=tmp_path / "ckpt")
    e = info.value
    assert e.result.history.epoch == [0, 1]
    assert e.checkpoint_dir == str(tmp_path / "ckpt")
    assert f"the last good checkpoint is in {tmp_path / 'ckpt'}" in "\n".join(e.__notes__)
    assert max(stats.unique_values(k) for _, k, _ in engine.kernels(
        e.result.model.get_layer("hidden"))) <= CLUSTERS


def test_a_layer_the_user_froze_stays_frozen_through_qat(digits):
    """tfmot's QuantizeWrapperV2 lists its inner kernel as trainable whatever the layer's
    flag: a layer the user froze would train during QAT."""
    model = tiny_sequential()
    model.get_layer("hidden").trainable = False
    compile_(model)
    before = model.get_layer("hidden").get_weights()[0].copy()
    r = _fit(model, digits, [Quantize(epochs=2)])
    raw = [w for w in r.model.get_layer("quant_hidden").weights if w.name == "hidden/kernel:0"]
    np.testing.assert_array_equal(raw[0].numpy(), before)
    assert "hidden/kernel:0" not in {w.name for w in r.model.trainable_weights}


def _rate_now(optimizer):
    """The rate the next step applies (the optimizer's schedule at its step counter)."""
    lr = optimizer._learning_rate
    return float(lr(optimizer.iterations) if callable(lr) else keras.backend.get_value(lr))


def test_decay_cosine_takes_each_phase_from_its_rate_to_zero_over_its_steps(digits):
    """decay='cosine': step k of a phase of S steps trains at rate * (1 + cos(pi k / S)) / 2;
    the next phase starts again from its own rate; a constant phase stays constant."""
    per_step = []

    class Steps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            per_step.append([])

        def on_train_batch_begin(self, batch, logs=None):
            per_step[-1].append(_rate_now(self.model.optimizer))

    (x, _), _ = digits
    steps = -(-len(x) // 64)
    _fit(tiny_sequential(), digits, [Prune(sparsity=0.5, epochs=2, decay="cosine"),
                                     Cluster(clusters=4, epochs=1, learning_rate=3e-3,
                                             decay="cosine"),
                                     Quantize(epochs=1)], callbacks=[Steps()],
         rate_policy="compiled")
    prune, cluster, quantize = per_step
    for rates, start in ((prune, 1e-2), (cluster, 3e-3)):
        total = len(rates)
        expected = [start * (1 + np.cos(np.pi * k / total)) / 2 for k in range(total)]
        np.testing.assert_allclose(rates, expected, rtol=1e-4)
    assert len(prune) == 2 * steps and len(cluster) == steps
    assert quantize == pytest.approx([1e-2] * len(quantize))  # the compiled rate, constant


def test_decay_cosine_without_a_starting_rate_is_refused_before_training(digits):
    model = tiny_sequential()
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=model.loss)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="decay='cosine' needs a starting rate"):
        _fit(model, digits, [Prune(sparsity=0.5, epochs=1),
                             Cluster(clusters=4, epochs=1, decay="cosine")])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert int(model.optimizer.iterations.numpy()) == 0


def test_best_only_checkpoint_and_restore_best_weights_keep_the_best_of_each_phase(
        digits, tmp_path):
    """A user's ModelCheckpoint(save_best_only=True) and EarlyStopping(restore_best_weights=
    True) start their best again at each phase: the checkpoint written last, and the weights
    restored, come from the last phase (pruned), not from the uncompressed Train epoch that
    had the best loss of the run."""
    (x, y), (xt, yt) = digits
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "best-{epoch}.h5"), monitor="loss",
                                           save_best_only=True, save_weights_only=True)
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    model = tiny_sequential()
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)  # a low loss the Prune phase won't beat
    result = _fit(model, digits, [Train(epochs=1, learning_rate=1e-4),
                                  Prune(sparsity=0.8, epochs=2, schedule="constant",
                                        learning_rate=1e-5)],
                  callbacks=[ckpt, stop])
    h = result.history.history
    assert h["loss"][0] < min(h["loss"][1:])  # the Train epoch was the best of the run
    written = sorted(int(p.name[5:-3]) for p in tmp_path.glob("best-*.h5"))  # 1-based epochs
    assert written[0] == 1 and written[-1] >= 2, written  # the Prune phase wrote its best
    assert ckpt.best == pytest.approx(min(h["loss"][1:]))
    stats = colopt.callbacks.layer_stats(result.model)
    assert all(s.sparsity >= 0.79 for s in stats.values())  # restored: a pruned epoch
