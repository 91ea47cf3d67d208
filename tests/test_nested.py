"""Nested models (a backbone inside a model, as in transfer learning): flattened for
collaborative_fit, walked by the drop-in callbacks, nothing left out silently."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt.callbacks import CompressionMetrics, InvariantGuard
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
def test_a_shared_nested_model_is_refused(make):
    model, words = make()
    with pytest.raises(ValueError, match="is called more than once") as e:
        engine.flatten_nested(model)
    msg = str(e.value)
    assert all(w in msg for w in words)
    assert "Expected each nested model to be called once" in msg and "Received: model" in msg


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
