"""Nested models (a backbone inside a model, as in transfer learning): flattened for
collaborative_fit, walked by the drop-in callbacks, nothing left out silently."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt import Cluster, Prune, Quantize
from keras_colopt.callbacks import CompressionMetrics, InvariantGuard, layer_stats
from keras_colopt.engines import tfmot as engine

from conftest import compile_, tiny_sequential
from test_callbacks import read_events

TOL = 0.01


def _randomize_batchnorm(model):
    """Moving statistics far from their initial 0/1, so that a BatchNorm in training mode
    (batch statistics) and one in inference mode (moving ones) give different outputs."""
    rng = np.random.default_rng(1)
    for _, layer in engine.walk(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.5, mean.shape).astype("float32"),
                               rng.uniform(0.5, 2.0, var.shape).astype("float32")])


def conv_backbone(name="backbone", seed=0):
    """Conv2D -> BatchNorm -> ReLU -> Flatten -> Dense: a small backbone to nest."""
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, name="conv")(i)
    h = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn")(h))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(keras.layers.Flatten()(h))
    return keras.Model(i, h, name=name)


def fine_tuning_model(seed=0):
    """The fine-tuning tutorial's pattern: backbone(x, training=False) -> a Dense head."""
    backbone = conv_backbone(seed=seed)
    i = keras.Input((8, 8, 1), name="image")
    o = keras.layers.Dense(10, name="logits")(backbone(i, training=False))
    return compile_(keras.Model(i, o, name="fine_tuned"))


def zoo():
    """Nesting inside nesting, a nested model with two inputs and two outputs, a frozen
    nested model, and a backbone called with training=False."""
    keras.utils.set_random_seed(0)
    block = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same", name="conv2"),
                              keras.layers.BatchNormalization(name="bn2")], name="block")
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(i)
    h = block(keras.layers.BatchNormalization(name="bn")(h))
    backbone = keras.Model(i, keras.layers.Flatten(name="flat")(h), name="backbone")

    a, b = keras.Input((256,)), keras.Input((16,))
    pa = keras.layers.Dense(16, name="p")(a)
    two = keras.Model([a, b], [keras.layers.Add(name="add")([pa, b]),
                               keras.layers.Concatenate(name="cat")([pa, b])], name="two")

    frozen = keras.Sequential([keras.layers.Dense(8, name="f1", input_shape=(48,)),
                               keras.layers.BatchNormalization(name="fbn")], name="frozen")
    frozen.trainable = False
    frozen.get_layer("f1").trainable = True  # still frozen: its model is

    x = keras.Input((8, 8, 1), name="image")
    f = backbone(x, training=False)
    s, c = two([f, keras.layers.Dense(16, name="side")(f)])
    g = frozen(keras.layers.Concatenate(name="join")([s, c]))
    model = keras.Model(x, keras.layers.Dense(10, name="logits")(g), name="zoo")
    _randomize_batchnorm(model)
    return model


# ------------------------------------------------------------------ flatten_nested

def test_flatten_computes_the_same_function_with_layers_named_by_path():
    model = zoo()
    flat = engine.flatten_nested(model)
    assert engine.nested_models(model) == ["backbone", "backbone/block", "two", "frozen"]
    assert engine.nested_models(flat) == []
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(flat(x, training=False), model(x, training=False), atol=1e-6)
    # In training mode too: the backbone's BatchNorms keep training=False, the frozen
    # model's BatchNorm stays in inference mode; batch statistics would differ from the
    # (randomized) moving ones.
    np.testing.assert_allclose(flat(x, training=True), model(x, training=True), atol=1e-6)

    names = [l.name for l in flat.layers if not isinstance(l, keras.layers.InputLayer)]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, l in engine.walk(model)
                          if not isinstance(l, keras.layers.InputLayer)}
    assert {"backbone/conv", "backbone/bn", "backbone/block/conv2", "backbone/block/bn2",
            "two/p", "two/add", "frozen/f1", "frozen/fbn", "side", "logits"} <= set(names)
    called_with = {e["name"]: node[0][3]["training"] for e in flat.get_config()["layers"]
                   for node in e["inbound_nodes"] if "training" in node[0][3]}
    assert called_with == {"backbone/bn": False, "backbone/block/bn2": False}

    assert not flat.get_layer("frozen/f1").trainable and not flat.get_layer("frozen/fbn").trainable
    assert flat.get_layer("backbone/conv").trainable and flat.get_layer("two/p").trainable
    assert len(flat.trainable_weights) == len(model.trainable_weights)
    assert len(flat.non_trainable_weights) == len(model.non_trainable_weights)

    # Copies: training the flat model leaves the original as it was.
    before = model(x, training=False).numpy()
    k = flat.get_layer("backbone/conv").kernel
    k.assign(k + 1.0)
    np.testing.assert_array_equal(model(x, training=False), before)


def test_a_model_without_nested_models_is_returned_as_is():
    model = tiny_sequential()
    assert engine.flatten_nested(model) is model
    assert [n for n, _ in engine.walk(model)] == [l.name for l in model.layers]


def test_path_names_survive_cloning_wrapping_and_weights():
    flat = engine.flatten_nested(fine_tuning_model())
    clone = engine.clone_model(flat)
    assert [l.name for l in clone.layers] == [l.name for l in flat.layers]
    pruned = tfmot.sparsity.keras.prune_low_magnitude(clone)
    assert "backbone/conv" in {engine.base_name(l) for l in pruned.layers}
    clone.set_weights(flat.get_weights())
    for a, b in zip(clone.get_weights(), flat.get_weights()):
        np.testing.assert_array_equal(a, b)


def _siamese():
    enc = conv_backbone(name="enc")
    a, b = keras.Input((8, 8, 1)), keras.Input((8, 8, 1))
    o = keras.layers.Dense(1)(keras.layers.Concatenate()([enc(a), enc(b)]))
    return compile_(keras.Model([a, b], o, name="siamese")), ("'enc'", "'siamese'")


def _shared_at_depth():
    enc = conv_backbone(name="enc")
    w1, w2 = keras.Sequential([enc], name="w1"), keras.Sequential([enc], name="w2")
    a, b = keras.Input((8, 8, 1)), keras.Input((8, 8, 1))
    o = keras.layers.Dense(1)(keras.layers.Concatenate()([w1(a), w2(b)]))
    return compile_(keras.Model([a, b], o, name="pair")), ("'w1/enc'", "'w2/enc'")


@pytest.mark.parametrize("make", [_siamese, _shared_at_depth])
def test_a_shared_nested_model_is_refused(make, digits):
    model, words = make()
    with pytest.raises(ValueError, match="is called more than once") as e:
        engine.flatten_nested(model)
    msg = str(e.value)
    assert all(w in msg for w in words)
    assert "Expected each nested model to be called once" in msg and "Received: model" in msg
    (x, y), _ = digits
    with pytest.raises(ValueError, match="is called more than once"):  # before any training
        colopt.collaborative_fit(model, [x[:8], x[:8]], y[:8] % 2, phases=[Prune(epochs=1)],
                                 verbose=0)


# ------------------------------------------------------------------ collaborative_fit

def test_training_false_holds_in_every_phase(digits, caplog):
    """The backbone's BatchNorm, called with training=False, keeps its moving statistics
    through Prune, Cluster and PCQAT (tfmot's quantize transforms drop the argument; it is
    put back), while its gamma trains."""
    (x, y), (xt, yt) = digits
    model = fine_tuning_model()
    _randomize_batchnorm(model)
    bn = model.get_layer("backbone").get_layer("bn")
    gamma, _, mean, var = [w.copy() for w in bn.get_weights()]
    with caplog.at_level("INFO", logger="keras_colopt"):
        r = colopt.collaborative_fit(model, x, y, phases=[
            Prune(sparsity=0.5, epochs=1), Cluster(clusters=4, epochs=1), Quantize(epochs=1)],
            batch_size=64, verbose=0)
    flattened = [rec.getMessage() for rec in caplog.records if "flattened" in rec.getMessage()]
    assert len(flattened) == 1 and "nested model(s) backbone" in flattened[0]
    assert engine.wrapper_kind(r.model) == "PCQAT"
    (qbn,) = [l for l in r.model.layers if engine.base_name(l) == "backbone/bn"]
    by_name = {w.name.split("/")[-1]: w.numpy() for w in qbn.weights}
    np.testing.assert_array_equal(by_name["moving_mean:0"], mean)
    np.testing.assert_array_equal(by_name["moving_variance:0"], var)
    assert not np.allclose(by_name["gamma:0"], gamma)  # it trained, in inference mode
    st = layer_stats(r.model)
    assert set(st) == {"backbone/conv", "backbone/hidden", "logits"}
    assert st["backbone/hidden"].sparsity >= 0.5 - TOL and st["backbone/hidden"].unique <= 5


def test_mobilenet_backbone_through_pcqat_into_the_tflite(tmp_path, caplog):
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNet(include_top=False, weights=None, alpha=0.25,
                                            input_shape=(32, 32, 3))
    model = compile_(keras.Sequential([backbone, keras.layers.GlobalAveragePooling2D(),
                                       keras.layers.Dense(10, name="head")]), lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    with caplog.at_level("INFO", logger="keras_colopt"):
        r = colopt.collaborative_fit(model, x, y, phases=[  # (random data: no rate probe)
            Prune(sparsity=0.5, epochs=2), Cluster(clusters=8, epochs=1), Quantize(epochs=1)],
            batch_size=32, verbose=0, log_dir=tmp_path / "logs", rate_policy="compiled")
    bb = backbone.name
    depthwise = [f"{bb}/{l.name}" for l in backbone.layers
                 if isinstance(l, keras.layers.DepthwiseConv2D)]
    pointwise = [l.name for l in backbone.layers
                 if type(l) is keras.layers.Conv2D and l.name.startswith("conv_pw")]
    assert len(depthwise) == 13 and len(pointwise) == 13
    assert r.skipped["Prune"] == depthwise
    assert r.skipped["Cluster (sparsity-preserving)"] == depthwise
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING
              and "cannot touch" in rec.getMessage()]
    assert len(warned) == 2 and all(all(n in w for n in depthwise) for w in warned)

    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                   representative_data=x[:16])
    deployed = colopt.export.inspect_tflite(info.path)
    for name in pointwise + ["head"]:
        key = f"quant_{bb}/{name}/" if name != "head" else "quant_head/"
        (w,) = [w for w in deployed if key in w.name]
        assert w.dtype == "int8"
        assert w.sparsity >= 0.5 - TOL, (name, w)
        assert w.unique_per_channel_max <= 8 + 1, (name, w)  # 8 clusters, + the pruned zero
    events = read_events(tmp_path / "logs" / "compression")
    last = events[max(events)]
    for name in pointwise:
        assert float(last[f"sparsity/{bb}/{name}"]) >= 0.5 - TOL
    assert f"sparsity/{bb}/conv_dw_1" in last and f"sparsity/{bb}" not in last


class _Interrupted(Exception):
    pass


class _StopAt(keras.callbacks.Callback):
    """Interrupts a run at the beginning of epoch `at`, keeping the weights it had then."""

    def __init__(self, at):
        super().__init__()
        self.at, self.weights = at, None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            self.weights = [w.copy() for w in self.model.get_weights()]
            raise _Interrupted


class _FirstWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = None

    def on_train_begin(self, logs=None):
        if self.weights is None:
            self.weights = [w.copy() for w in self.model.get_weights()]


def test_checkpoint_resume_of_a_nested_model(digits, tmp_path):
    (x, y), _ = digits
    phases = [Prune(sparsity=0.5, epochs=2), Cluster(clusters=4, epochs=1)]
    # One model object for both calls: a second fine_tuning_model() in this process would
    # get other automatic layer names (input_7...), a model the checkpoint does not match.
    model = fine_tuning_model()
    stop = _StopAt(1)
    with pytest.raises(_Interrupted):
        colopt.collaborative_fit(model, x, y, phases=phases, batch_size=64,
                                 verbose=0, checkpoint_dir=tmp_path, callbacks=[stop])
    first = _FirstWeights()
    r = colopt.collaborative_fit(model, x, y, phases=phases, batch_size=64,
                                 verbose=0, checkpoint_dir=tmp_path, callbacks=[first])
    assert r.resumed_at == 1 and r.history.epoch == [0, 1, 2]
    assert len(first.weights) == len(stop.weights)
    for a, b in zip(first.weights, stop.weights):  # masks, pruning step, kernels
        np.testing.assert_array_equal(a, b)
    st = layer_stats(r.model)
    assert st["backbone/conv"].sparsity >= 0.5 - TOL and st["backbone/conv"].unique <= 5


def test_initial_phase_continues_a_nested_run(digits):
    (x, y), _ = digits
    phases = [Prune(sparsity=0.5, epochs=1), Cluster(clusters=4, epochs=1)]
    first = colopt.collaborative_fit(fine_tuning_model(), x, y, phases=phases[:1],
                                     batch_size=64, verbose=0)
    pruned = engine.strip(first.model)
    engine.compile_like(pruned, engine.compile_config(fine_tuning_model()))
    r = colopt.collaborative_fit(pruned, x, y, phases=phases, initial_phase=1, batch_size=64,
                                 verbose=0)
    assert r.history.history["phase"] == ["Cluster (sparsity-preserving)"]
    st = layer_stats(r.model)
    for name in ("backbone/conv", "backbone/hidden", "logits"):
        assert st[name].sparsity >= 0.5 - TOL and st[name].unique <= 5, (name, st[name])


# ------------------------------------------------------------------ drop-in callbacks

def _nested_pruned():
    """backbone (pruned by tfmot, wrappers inside) nested in a Sequential nested in the
    model: the drop-in callbacks must look two levels down."""
    backbone = tfmot.sparsity.keras.prune_low_magnitude(
        conv_backbone(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
            0.5, begin_step=0, frequency=1))
    deep = keras.Sequential([backbone], name="deep")
    i = keras.Input((8, 8, 1))
    return compile_(keras.Model(i, keras.layers.Dense(10, name="logits")(deep(i)), name="m"))


def test_drop_in_callbacks_look_inside_nested_models(digits, tmp_path):
    (x, y), _ = digits
    model = _nested_pruned()
    metrics = CompressionMetrics(log_dir=tmp_path / "logs")
    guard = InvariantGuard()  # expectations read from the nested wrappers
    h = model.fit(x, y, batch_size=64, epochs=1, verbose=0,
                  callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), metrics, guard])
    layers = ["deep/backbone/conv", "deep/backbone/hidden", "logits"]
    assert set(guard.expectations()) == {"deep/backbone/conv", "deep/backbone/hidden"}
    assert h.history["invariants/violations"] == [0]
    tags = read_events(tmp_path / "logs" / "compression")[0]
    assert set(tags) == {f"{kind}/{l}" for kind in ("sparsity", "unique_weights", "weights")
                         for l in layers}
    assert float(tags["sparsity/deep/backbone/hidden"]) >= 0.5 - TOL
    assert float(tags["sparsity/logits"]) == 0.0

    # A broken mask inside the nested wrapper: the kernel densifies.
    wrapper = model.get_layer("deep").get_layer("backbone").get_layer(
        "prune_low_magnitude_hidden")
    for weight, mask, _ in wrapper.pruning_vars:
        mask.assign(tf.ones_like(mask))
        weight.assign(tf.random.normal(weight.shape) + 0.1)
    guard.set_model(model)
    guard.on_train_begin()
    with pytest.raises(colopt.InvariantViolation) as e:
        guard.on_epoch_end(1, {})
    (v,) = e.value.violations
    assert (v.layer, v.invariant, v.phase) == ("deep/backbone/hidden", "sparsity", "prune")
    assert "layer 'deep/backbone/hidden', phase prune, epoch 1" in str(e.value)


def test_engine_reads_wrappers_inside_nested_models(digits):
    model = _nested_pruned()
    assert engine.wrapper_kind(model) == "prune" and not engine.is_qat(model)
    assert set(engine.expectations(model)) == {"deep/backbone/conv", "deep/backbone/hidden"}
    stripped = engine.strip(model)
    assert engine.wrapper_kind(stripped) == "none"
    assert [n for n, _ in engine.walk(stripped)] == [n for n, _ in engine.walk(model)]

    qat = tfmot.quantization.keras.quantize_model(conv_backbone())
    i = keras.Input((8, 8, 1))
    outer = keras.Model(i, keras.layers.Dense(10)(qat(i)))
    assert engine.is_qat(outer) and engine.wrapper_kind(outer) == "QAT"
    # Guard names must be path names, checked before training.
    (x, y), _ = digits
    with pytest.raises(ValueError, match=r"names layer\(s\) \['hidden'\]"):
        model.fit(x[:8], y[:8], verbose=0, callbacks=[
            tfmot.sparsity.keras.UpdatePruningStep(), InvariantGuard(sparsity={"hidden": 0.5})])


class _Opaque(keras.Model):
    """A subclassed model: tfmot cannot open it, and flatten_nested does not."""

    def __init__(self):
        super().__init__(name="opaque")
        self.d = keras.layers.Dense(16)

    def call(self, x):
        return self.d(x)


def test_a_nested_subclassed_model_is_listed_as_skipped_not_lost(digits, caplog):
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([keras.layers.Flatten(input_shape=(8, 8, 1), name="flat"),
                                       _Opaque(), keras.layers.Dense(10, name="logits")]))
    (x, y), _ = digits
    with caplog.at_level(logging.WARNING, logger="keras_colopt"):
        r = colopt.collaborative_fit(model, x, y, phases=[Prune(sparsity=0.5, epochs=1)],
                                     batch_size=64, verbose=0)
    assert r.skipped["Prune"] == ["opaque"]
    assert any("cannot touch 1 layer(s)" in m and "opaque" in m for m in caplog.messages)
