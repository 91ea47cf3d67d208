"""Multi-output models: the user's output names in every phase (losses, metrics, History,
callbacks), and .tflite outputs read by those names."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt import export

from conftest import Recorder, tiny_sequential

PHASES = [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=1),
          colopt.Cluster(clusters=4, epochs=1), colopt.Quantize(epochs=1)]
LABELS = ["Train", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]
WRAPPER_WORDS = ("prune_low_magnitude", "quant_", "cluster_", "aux_logits")


def two_heads(seed=0):
    """Digits with two 10-way heads: `cls` (the digit) and `aux` ((digit + 1) % 10), so that
    swapped outputs cannot pass for each other. `aux` ends in a standalone ReLU layer, which
    preserving QAT folds into the Dense before it: the output layer changes, its name must not.
    """
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(i)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(32, activation="relu", name="hidden")(h)
    cls = keras.layers.Dense(10, name="cls")(h)
    aux = keras.layers.ReLU(name="aux")(keras.layers.Dense(10, name="aux_logits")(h))
    model = keras.Model(i, [cls, aux], name="two_heads")
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"cls": xent, "aux": xent},
                  loss_weights={"cls": 1.0, "aux": 0.5},
                  metrics={"cls": ["accuracy"], "aux": ["accuracy"]})
    return model


def labels(y):
    return {"cls": y, "aux": (y + 1) % 10}


class SeesMonitor(keras.callbacks.EarlyStopping):
    """A user's EarlyStopping on `val_cls_loss` that records what it read each epoch."""

    def __init__(self, **kwargs):
        super().__init__(monitor="val_cls_loss", **kwargs)
        self.seen = []

    def get_monitor_value(self, logs):
        value = super().get_monitor_value(logs)
        self.seen.append(value)
        return value


@pytest.fixture(scope="module")
def run(digits):
    (x, y), (xt, yt) = digits
    recorder, monitor = Recorder(), SeesMonitor(patience=100)
    result = colopt.collaborative_fit(
        two_heads(), x, labels(y), phases=PHASES, validation_data=(xt, labels(yt)),
        batch_size=64, callbacks=[recorder, monitor], verbose=0)
    return result, recorder, monitor


def test_history_keeps_the_users_names_in_every_phase(run):
    result, recorder, _ = run
    h = result.history.history
    assert h["phase"] == LABELS
    assert result.folded == {"aux_logits": "aux"}
    for key in ("loss", "cls_loss", "aux_loss", "cls_accuracy", "aux_accuracy",
                "val_loss", "val_cls_loss", "val_aux_loss", "val_cls_accuracy"):
        assert len(h[key]) == 4 and all(math.isfinite(v) for v in h[key]), key
    assert not [k for k in h if any(w in k for w in WRAPPER_WORDS)]
    # Each epoch's logs (what every callback sees) hold the same user keys in every phase.
    users = [[k for k in keys if "/" not in k] for keys in recorder.log_keys]
    assert len(users) == 4 and all(u == users[0] for u in users)
    assert result.model.output_names == ["cls", "aux"]


def test_a_users_early_stopping_reads_its_key_in_every_phase(run):
    _, recorder, monitor = run
    assert recorder.train_begins == 4
    assert len(monitor.seen) == 4 and all(v is not None and math.isfinite(v)
                                          for v in monitor.seen)


def test_a_users_early_stopping_stops_a_later_phase(digits):
    (x, y), (xt, yt) = digits
    stop = keras.callbacks.EarlyStopping(monitor="val_cls_loss", min_delta=10.0, patience=0)
    result = colopt.collaborative_fit(
        two_heads(), x, labels(y), phases=[colopt.Train(epochs=1), colopt.Prune(epochs=3)],
        validation_data=(xt, labels(yt)), batch_size=64, callbacks=[stop], verbose=0)
    # Each phase is one fit(): the first epoch of Prune sets its best, the second stops it.
    assert result.stopped_early == "Prune"
    assert result.history.epoch == [0, 1, 2]


@pytest.fixture(scope="module")
def exported(run, digits, tmp_path_factory):
    """The PCQAT model and a plain (PTQ) one, exported to int8."""
    (x, y), _ = digits
    folder = tmp_path_factory.mktemp("multi")
    plain = two_heads()
    plain.fit(x, labels(y), batch_size=64, epochs=3, verbose=0)
    return {
        "qat": (run[0].model, export.to_tflite(run[0].model, folder / "qat.tflite").path),
        "plain": (plain, export.to_tflite(plain, folder / "plain.tflite",
                                          representative_data=x[:128]).path)}


@pytest.mark.parametrize("kind", ["qat", "plain"])
def test_tflite_outputs_by_keras_name(exported, digits, kind):
    _, (xt, yt) = digits
    model, path = exported[kind]
    assert sorted(export.output_names(path)) == ["aux", "cls"]
    keras_out = dict(zip(model.output_names, model.predict(xt, verbose=0)))
    every = export.predict_tflite(path, xt, output="all")
    assert sorted(every) == ["aux", "cls"]
    for name in ("cls", "aux"):
        agree = np.mean(np.argmax(every[name], -1) == np.argmax(keras_out[name], -1))
        assert agree >= 0.95, (name, agree)
        np.testing.assert_array_equal(export.predict_tflite(path, xt, output=name), every[name])
    # The two heads answer different questions: a swap would not pass for the right head.
    assert np.mean(np.argmax(every["cls"], -1) == np.argmax(keras_out["aux"], -1)) < 0.5
    for name, truth in labels(yt).items():
        keras_acc = float(np.mean(np.argmax(keras_out[name], -1) == truth))
        assert export.evaluate_tflite(path, xt, truth, output=name) == pytest.approx(
            keras_acc, abs=0.04)
        assert export.evaluate_tflite(path, xt, labels(yt), output=name) == \
            export.evaluate_tflite(path, xt, truth, output=name)


def test_tflite_refuses_to_guess_the_output(exported, digits):
    _, (xt, yt) = digits
    _, path = exported["qat"]
    with pytest.raises(ValueError, match=r"2 outputs: \['aux', 'cls'\].*output='all'"):
        export.predict_tflite(path, xt)
    with pytest.raises(ValueError, match=r"2 outputs: \['aux', 'cls'\]"):
        export.evaluate_tflite(path, xt, yt)
    with pytest.raises(ValueError, match=r"no output named 'head'. Expected one of \['aux', "):
        export.evaluate_tflite(path, xt, yt, output="head")
    with pytest.raises(ValueError, match="scores one output"):
        export.evaluate_tflite(path, xt, yt, output="all")


def test_single_output_files_work_as_before(digits, tmp_path):
    (x, y), (xt, yt) = digits
    model = tiny_sequential()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    path = export.to_tflite(model, tmp_path / "one.tflite", quantization="none").path
    (name,) = export.output_names(path)
    assert name == "logits"
    pred = export.predict_tflite(path, xt)
    np.testing.assert_allclose(pred, model.predict(xt, verbose=0), atol=1e-4)
    np.testing.assert_array_equal(export.predict_tflite(path, xt, output="logits"), pred)
    assert export.evaluate_tflite(path, xt, yt) == export.evaluate_tflite(path, xt, yt,
                                                                          output="logits")
    with pytest.raises(ValueError, match="no output named 'cls'"):
        export.predict_tflite(path, xt, output="cls")


def test_multi_input_qat_model_takes_a_dict_of_inputs(tmp_path):
    keras.utils.set_random_seed(0)
    a, b = keras.Input((6,), name="zin"), keras.Input((4,), name="ain")
    h = keras.layers.Dense(8, activation="relu", name="h")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], [keras.layers.Dense(3, name="zeta")(h),
                                 keras.layers.Dense(2, name="alpha")(h)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    xa, xb = rng.random((64, 6), "float32"), rng.random((64, 4), "float32")
    result = colopt.collaborative_fit(model, [xa, xb], [rng.random((64, 3)), rng.random((64, 2))],
                                      phases=[colopt.Quantize(epochs=1)], batch_size=32,
                                      verbose=0)
    assert result.model.output_names == ["zeta", "alpha"]
    path = export.to_tflite(result.model, tmp_path / "mi.tflite").path
    out = export.predict_tflite(path, {"zin": xa, "ain": xb}, batch_size=16, output="all")
    ref = dict(zip(["zeta", "alpha"], result.model.predict([xa, xb], verbose=0)))
    for name in ("zeta", "alpha"):
        np.testing.assert_allclose(out[name], ref[name], atol=0.1)
    with pytest.raises(ValueError, match=r"2 inputs: \['ain', 'zin'\].*dict"):
        export.predict_tflite(path, [xa, xb], output="zeta")
    with pytest.raises(ValueError, match=r"Expected the keys \['ain', 'zin'\]"):
        export.predict_tflite(path, {"zin": xa}, output="zeta")


def test_checkpoint_resume_under_a_strategy_keeps_the_names(digits, tmp_path):
    (x, y), (xt, yt) = digits
    x, y = x[:256], y[:256]

    def call():
        return colopt.collaborative_fit(
            two_heads(), x, labels(y), phases=PHASES[:2] + PHASES[3:],
            validation_data=(xt, labels(yt)), batch_size=64, verbose=0,
            checkpoint_dir=tmp_path / "ckpt", strategy=tf.distribute.MirroredStrategy())
    first = call()
    again = call()  # every epoch was done: restores the PQAT state (weights, optimizer)
    assert again.resumed_at == 3
    assert again.history.history["val_cls_loss"] == first.history.history["val_cls_loss"]
    assert again.model.output_names == ["cls", "aux"]
    for a, b in zip(again.model.get_weights(), first.model.get_weights()):
        np.testing.assert_array_equal(a, b)
