"""One contract, every phase: each phase from a single settings table, run alone (after a short
Train) through collaborative_fit, must keep the same promises."""

import numpy as np
import pytest

import keras_colopt as colopt
from keras_colopt.callbacks import layer_stats
from keras_colopt.engines import tfmot as engine

from conftest import Recorder, tiny_sequential

# phase, its label in the plan, and what must hold on the returned model's kernels.
SETTINGS = [
    (colopt.Train(epochs=2, learning_rate=5e-3), "Train",
     lambda st: all(s.sparsity == 0.0 for s in st.values())),
    (colopt.Prune(sparsity=0.75, epochs=2, schedule="constant", layers=["hidden", "logits"]),
     "Prune", lambda st: st["hidden"].sparsity >= 0.74 and st["conv"].sparsity == 0.0),
    (colopt.Cluster(clusters=6, epochs=2, init="density", layers=["hidden"]), "Cluster",
     lambda st: st["hidden"].unique <= 6 and st["logits"].unique > 6),
    (colopt.Quantize(epochs=2), "QAT", lambda st: st["hidden"].unique <= 255),
]


@pytest.mark.parametrize("phase,label,holds", SETTINGS, ids=[s[1] for s in SETTINGS])
def test_phase_contract(digits, tmp_path, phase, label, holds):
    (x, y), (xt, yt) = digits
    model = tiny_sequential()
    before = [w.copy() for w in model.get_weights()]
    rec = Recorder()
    r = colopt.collaborative_fit(model, x, y, phases=[colopt.Train(epochs=1), phase],
                                 validation_data=(xt, yt), batch_size=64, callbacks=[rec],
                                 log_dir=tmp_path / "logs", verbose=0)
    # The plan, the epoch axis and the history.
    assert [p.label for p in r.plan] == ["Train", label]
    assert rec.epochs == [0, 1, 2] and rec.train_begins == 2
    assert r.history.history["phase"] == ["Train", label, label]
    assert len(r.history.history["compression/sparsity"]) == 3
    # The phase's own promise, on the weights the model computes with.
    assert holds(layer_stats(r.model))
    # A Quantize phase returns a QAT model; the others do not.
    assert engine.is_qat(r.model) == (label == "QAT")
    # The config round-trips, and the user's model is untouched.
    assert type(phase).from_config(phase.get_config()) == phase
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # And it exports.
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                   representative_data=x[:32])
    assert info.gzip_bytes > 0


# ------------------------------------------------------------------ engine conformance
# Every engine must pass these, on a tiny model of its own Keras flavour: each path of the
# deployment tree with its invariants in Keras and in the int8 .tflite, the user's callbacks
# on one epoch axis, and resume from a checkpoint. A new engine adds one row here.

def _compiled(keras, model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _nested(keras):
    """A small 'backbone' Functional model inside a Sequential with a head."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(i)
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(h)
    backbone = keras.Model(i, h, name="backbone")
    return _compiled(keras, keras.Sequential([keras.Input((8, 8, 1)), backbone,
                                              keras.layers.Flatten(name="flat"),
                                              keras.layers.Dense(10, name="logits")],
                                             name="outer"))


def _tfmot_settings():
    import tf_keras as keras

    return {"tiny_model": tiny_sequential, "nested_model": lambda: _nested(keras),
            "callback_base": keras.callbacks.Callback, "qat": True}


def _keras3_settings():
    import keras

    return {"tiny_model": lambda: tiny_sequential(keras=keras),
            "nested_model": lambda: _nested(keras),
            "callback_base": keras.callbacks.Callback, "qat": True}


ENGINES = [("tfmot", _tfmot_settings), ("keras3", _keras3_settings)]


def _last(flavour):
    """The phase that ends the callback, resume and nested tests, and its label after Prune:
    QAT where the engine has it, else sparsity-preserving clustering."""
    if flavour["qat"]:
        return colopt.Quantize(epochs=1), "PQAT"
    return colopt.Cluster(clusters=6, epochs=1), "Cluster (sparsity-preserving)"


PATHS = [  # phases after Train(1), what the last phase is called, (sparsity, clusters) kept
    ([colopt.Prune(sparsity=0.5, epochs=2), colopt.Cluster(clusters=6, epochs=1)],
     "Cluster (sparsity-preserving)", (0.5, 6 + 1)),
    ([colopt.Prune(sparsity=0.5, epochs=2), colopt.Quantize(epochs=1)], "PQAT", (0.5, None)),
    ([colopt.Cluster(clusters=6, epochs=1), colopt.Quantize(epochs=1)], "CQAT", (None, 6)),
    ([colopt.Cluster(clusters=6, epochs=1, per_channel=True), colopt.Quantize(epochs=1)],
     "CQAT", (None, 6)),
    ([colopt.Prune(sparsity=0.5, epochs=2), colopt.Cluster(clusters=6, epochs=1),
      colopt.Quantize(epochs=1)], "PCQAT", (0.5, 6 + 1)),
]


@pytest.fixture(params=ENGINES, ids=[e[0] for e in ENGINES])
def flavour(request):
    return request.param[1]()


@pytest.mark.parametrize("phases,label,kept", PATHS,
                         ids=["spc", "pqat", "cqat", "cqat-per-channel", "pcqat"])
def test_engine_path_keeps_its_invariants_in_keras_and_tflite(digits, tmp_path, flavour,
                                                              phases, label, kept):
    (x, y), (xt, yt) = digits
    r = colopt.collaborative_fit(flavour["tiny_model"](), x, y,
                                 phases=[colopt.Train(epochs=1)] + phases,
                                 validation_data=(xt, yt), batch_size=64, verbose=0)
    assert r.plan.phases[-1].label == label
    sparsity, clusters = kept
    per_channel = any(getattr(p, "per_channel", False) for p in phases)
    keras_stats = layer_stats(r.model)
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                   representative_data=x[:64])
    deployed = colopt.export.inspect_tflite(info.path)
    assert deployed and all(w.dtype == "int8" for w in deployed)
    for name, s in keras_stats.items():
        if sparsity is not None:
            assert s.sparsity >= sparsity - 0.01, (name, s)
        if clusters is not None:
            # Fake-quantized per output channel (QAT), a per-tensor codebook becomes one scaled
            # copy per channel: the bound holds per channel.
            by_channel = per_channel or label.endswith("QAT")
            n = s.unique_per_channel_max if by_channel else s.unique
            assert n <= clusters, (name, s)
    for w in deployed:  # every weight tensor, read back from the file
        if sparsity is not None:
            assert w.sparsity >= sparsity - 0.01, w
        if clusters is not None:
            assert w.unique_per_channel_max <= clusters, w


def test_engine_drives_the_users_callbacks_on_one_epoch_axis(digits, flavour):
    (x, y), _ = digits
    seen = []

    class Epochs(flavour["callback_base"]):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    last, label = _last(flavour)
    r = colopt.collaborative_fit(flavour["tiny_model"](), x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Train(epochs=1),
                                         colopt.Prune(sparsity=0.5, epochs=2), last],
                                 callbacks=[Epochs()])
    assert seen == [0, 1, 2, 3]
    assert r.history.history["phase"] == ["Train", "Prune", "Prune", label]
    assert r.history.history["compression/sparsity"][-1] >= 0.49


def test_engine_resumes_from_its_checkpoint(digits, tmp_path, flavour):
    """A run that a callback stopped after the first epoch of its last phase (PCQAT, after
    Prune and Cluster) resumes where its checkpoint left it, and ends as an uninterrupted run
    does (same data order): the resumed phase still keeps the zeros and the clusters."""
    (x, y), _ = digits
    phases = [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=2),
              colopt.Cluster(clusters=6, epochs=1), colopt.Quantize(epochs=2)]

    def fit(ckpt, callbacks=()):
        return colopt.collaborative_fit(flavour["tiny_model"](), x[:128], y[:128],
                                        phases=phases, batch_size=64, verbose=0,
                                        shuffle=False, checkpoint_dir=ckpt,
                                        callbacks=list(callbacks))

    class StopAt5(flavour["callback_base"]):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 4:
                self.model.stop_training = True

    whole = fit(tmp_path / "whole")
    stopped = fit(tmp_path / "cut", [StopAt5()])
    assert stopped.stopped_early == "PCQAT" and stopped.history.epoch == [0, 1, 2, 3, 4]
    resumed = fit(tmp_path / "cut")
    assert resumed.resumed_at == 5 and resumed.history.epoch == [0, 1, 2, 3, 4, 5]
    assert resumed.history.history["phase"][-1] == "PCQAT"
    for name, st in layer_stats(resumed.model).items():
        assert st.sparsity >= 0.49 and st.unique_per_channel_max <= 6 + 1, (name, st)
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_engine_compresses_inside_nested_models(digits, tmp_path, flavour):
    """A backbone nested in the model is compressed like any layer, named by its path, in
    Keras and in the .tflite; the user's model is left as it was."""
    (x, y), _ = digits
    model = flavour["nested_model"]()
    before = [w.copy() for w in model.get_weights()]
    r = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Prune(sparsity=0.5, epochs=2),
                                         colopt.Cluster(clusters=6, epochs=1)]
                                 + ([colopt.Quantize(epochs=1)] if flavour["qat"] else []))
    st = layer_stats(r.model)
    assert {"backbone/conv", "backbone/conv2", "logits"} <= set(st)
    for name in ("backbone/conv", "backbone/conv2", "logits"):
        assert st[name].sparsity >= 0.49 and st[name].unique_per_channel_max <= 7, (name, st[name])
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                   representative_data=x[:64])
    deployed = colopt.export.inspect_tflite(info.path)
    assert len(deployed) == 3
    assert all(w.sparsity >= 0.49 and w.unique_per_channel_max <= 7 for w in deployed)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
