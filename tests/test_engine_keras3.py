"""The Keras 3 engine's own math: pruning masks on their schedule at every step, m:n
structure, clustering per tensor and per channel with its zeros, and saving a compressed
model with its masks and centroids."""

import logging
import re

import numpy as np
import pytest

import keras_colopt as colopt
from keras_colopt.engines import get_engine
from keras_colopt.engines.keras3 import compress

keras = pytest.importorskip("keras")


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((8, 8, 1)),
                          keras.layers.Conv2D(8, 3, name="conv"),
                          keras.layers.DepthwiseConv2D(3, name="dw"),
                          keras.layers.Flatten(name="flat"),
                          keras.layers.Dense(16, name="hidden")])
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return m


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 1), "float32"), rng.random((n, 16), "float32")


class _EveryStep(keras.callbacks.Callback):
    """The fraction of zeros of each layer's effective kernel after every training step."""

    def __init__(self):
        super().__init__()
        self.zeros = []

    def on_train_batch_end(self, batch, logs=None):
        self.zeros.append({l.name: float(np.mean(compress.effective_numpy(l) == 0))
                           for l in self.model.layers if compress.is_compressed(l)})


def test_keras3_model_is_taken_by_the_keras3_engine():
    assert get_engine(_model()).name == "keras3"


def test_prune_follows_the_polynomial_schedule_at_every_step():
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    m = _model()
    spec = compress.PruneSpec(0.75, initial_sparsity=0.0, end_step=6, frequency=2)
    for l in m.layers:
        if compress.supports(l):
            compress.make_prunable(l, spec)
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    rec = _EveryStep()
    x, y = _data()
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[rec])  # 8 steps
    for batch, zeros in enumerate(rec.zeros):
        # Steps count from 1; the mask of step t is the one computed at the last update step
        # <= t (the first step, then every 2nd, up to 6), on tfmot's cubic ramp
        # 0.75 * (1 - (1 - t/6)^3).
        t = batch + 1
        last = max(u for u in range(1, min(t, 6) + 1) if u == 1 or u % 2 == 0)
        target = 0.75 * (1 - (1 - last / 6) ** 3)
        # The library's one formula, and tfmot's own PolynomialDecay (as the tfmot engine
        # builds it), say the same
        assert colopt.phases.polynomial_sparsity(0.0, 0.75, last / 6) == pytest.approx(target)
        _, tfmot_target = tfmot.sparsity.keras.PolynomialDecay(
            0.0, 0.75, begin_step=0, end_step=6, frequency=2)(tf.constant(last, tf.int64))
        assert float(tfmot_target) == pytest.approx(target, abs=1e-6)
        assert zeros, batch
        for name, z in zeros.items():
            size = compress.raw_kernel(m.get_layer(name)).shape
            n = int(np.prod(size))
            assert z == pytest.approx(np.floor(target * n + 1e-6) / n, abs=1e-9), (batch, name)
    assert all(z == pytest.approx(0.75, abs=0.01) for z in rec.zeros[-1].values())


def test_m_by_n_keeps_two_of_every_four_input_weights():
    m = _model()
    dense = m.get_layer("hidden")
    compress.make_prunable(dense, compress.PruneSpec(0.5, m_by_n=(2, 4), frequency=1))
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    m.fit(*_data(), batch_size=16, epochs=1, verbose=0)
    w = compress.effective_numpy(dense)  # (in, out): groups of 4 along `in`
    groups = (w.T.reshape(w.shape[1], -1, 4) != 0).sum(-1)
    assert groups.max() == 2 and groups.min() == 2


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_cluster_keeps_its_values_and_its_zeros_while_training(per_channel):
    m = _model()
    layers = [l for l in m.layers if compress.supports(l)]
    # Zero a third of each kernel first, as a Prune phase would have.
    zero = {}
    for l in layers:
        k = np.asarray(compress.raw_kernel(l).numpy())
        k[np.abs(k) < np.quantile(np.abs(k), 1 / 3)] = 0
        compress.raw_kernel(l).assign(k)
        zero[l.name] = k == 0
        v = k.reshape(-1, compress.view_channels(l))
        rng = np.random.default_rng(0)
        c = (np.stack([compress.init_centroids(v[:, j][v[:, j] != 0], 4, "kmeans++", rng)
                       for j in range(v.shape[1])]) if per_channel else
             compress.init_centroids(v[v != 0], 4, "kmeans++", rng))
        compress.make_clusterable(l, compress.ClusterSpec(4, per_channel=per_channel,
                                                          preserve_sparsity=True), c)
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = {l.name: compress.effective_numpy(l) for l in layers}
    m.fit(*_data(), batch_size=16, epochs=2, verbose=0)
    for l in layers:
        w = compress.effective_numpy(l)
        assert not np.array_equal(w, before[l.name]), l.name  # the centroids trained
        np.testing.assert_array_equal(w == 0, zero[l.name])
        v = w.reshape(-1, compress.view_channels(l))
        counts = ([len(np.unique(v[:, j][v[:, j] != 0])) for j in range(v.shape[1])]
                  if per_channel else [len(np.unique(v[v != 0]))])
        assert max(counts) <= 4, (l.name, counts)


def test_effective_kernel_read_by_the_callbacks_follows_every_change_of_the_layer():
    # effective_numpy runs a graph traced once per compression state: it must never serve
    # a stale kernel (the callbacks' sparsity and unique counts would be wrong).
    layer = keras.layers.Dense(6)
    layer.build((None, 10))

    def eager():
        return np.asarray(compress.effective(layer, compress.raw_kernel(layer)))
    np.testing.assert_array_equal(compress.effective_numpy(layer), eager())
    compress.make_prunable(layer, compress.PruneSpec(0.5, schedule="constant"))
    layer._colopt_mask.assign(np.tile([1.0, 0.0], (10, 3)))
    np.testing.assert_array_equal(compress.effective_numpy(layer), eager())
    assert np.mean(compress.effective_numpy(layer) == 0) == 0.5
    compress.raw_kernel(layer).assign(np.full((10, 6), 0.25, np.float32))  # a weight update
    np.testing.assert_array_equal(compress.effective_numpy(layer),
                                  np.tile([0.25, 0.0], (10, 3)).astype(np.float32))
    compress.raw_kernel(layer).assign(np.linspace(-1, 1, 60, dtype=np.float32).reshape(10, 6))
    compress.make_clusterable(layer, compress.ClusterSpec(3, preserve_sparsity=False),
                              np.array([-0.5, 0.0, 0.5], np.float32))
    np.testing.assert_array_equal(compress.effective_numpy(layer), eager())
    assert set(np.unique(compress.effective_numpy(layer))) <= {-0.5, 0.0, 0.5}
    layer._colopt_centroids.assign(np.array([-0.7, 0.0, 0.3], np.float32))  # centroids train
    assert set(np.unique(compress.effective_numpy(layer))) <= set(np.float32([-0.7, 0.0, 0.3]))
    compress.make_quantized(layer, compress.QuantizeSpec(outputs=False))
    np.testing.assert_array_equal(compress.effective_numpy(layer), eager())
    scale = np.abs(eager()).max(0) / 127
    grid = compress.effective_numpy(layer) / np.where(scale > 0, scale, 1)
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)  # on the int8 grid


def test_compressed_model_saves_and_loads_with_its_masks_and_centroids(tmp_path):
    m = _model()
    compress.make_prunable(m.get_layer("conv"), compress.PruneSpec(0.5, schedule="constant"))
    hidden = m.get_layer("hidden")
    compress.make_clusterable(hidden, compress.ClusterSpec(4), np.linspace(-0.3, 0.3, 4))
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data()
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    m.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(back.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
    for name in ("conv", "hidden"):
        np.testing.assert_array_equal(compress.effective_numpy(back.get_layer(name)),
                                      compress.effective_numpy(m.get_layer(name)))
    assert len(np.unique(compress.effective_numpy(back.get_layer("hidden")))) <= 4
    # Training the loaded model goes on keeping the zeros of the saved mask.
    back.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.mean(compress.effective_numpy(back.get_layer("conv")) == 0) >= 0.5


def test_compressed_model_loads_in_a_new_process_that_imports_keras_colopt(digits, tmp_path):
    """The saved file names the engine's layer classes: a fresh interpreter that imports
    keras_colopt (and nothing of the engine) reads it with keras.models.load_model, a PCQAT
    SeparableConv2D, LayerNormalization and MultiHeadAttention included."""
    import subprocess
    import sys

    x, y = digits[0]
    L = keras.layers
    i = keras.Input(x.shape[1:])
    h = L.SeparableConv2D(8, 3, padding="same", name="sep")(L.Conv2D(8, 3, name="conv")(i))
    h = L.LayerNormalization(name="ln")(L.Reshape((6, 48))(h))
    h = L.MultiHeadAttention(2, 4, name="mha")(h, h)
    m = keras.Model(i, L.Dense(10, name="dense")(L.Flatten()(h)))
    m.compile(optimizer="adam", metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r = colopt.collaborative_fit(m, x[:256], y[:256], batch_size=32, verbose=0,
                                 rate_policy="compiled", phases=[  # (loading: no rate probe)
        colopt.Prune(sparsity=0.5, epochs=1), colopt.Cluster(clusters=4, epochs=1),
        colopt.Quantize(epochs=1)])
    path = str(tmp_path / "pcqat.keras")
    r.model.save(path)
    np.save(tmp_path / "x.npy", x[:16])
    code = ("import sys, numpy as np, keras, keras_colopt; "
            "m = keras.models.load_model(sys.argv[1]); "
            "np.save(sys.argv[2], m.predict(np.load(sys.argv[3]), verbose=0))")
    proc = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "out.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               r.model.predict(x[:16], verbose=0), atol=1e-5)


def test_collaborative_fit_on_keras3_leaves_the_model_and_exports(digits, tmp_path):
    (x, y), (xt, yt) = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)),
                              keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
                              keras.layers.DepthwiseConv2D(3, activation="relu", name="dw"),
                              keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(10, name="logits")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.copy() for w in model.get_weights()]
    r = colopt.collaborative_fit(model, x, y, validation_data=(xt, yt), batch_size=64,
                                 verbose=0, phases=[colopt.Train(epochs=1),
                                                    colopt.Prune(sparsity=0.5, epochs=2),
                                                    colopt.Cluster(clusters=8, epochs=1)])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert r.history.history["phase"] == ["Train", "Prune", "Prune",
                                          "Cluster (sparsity-preserving)"]
    st = colopt.callbacks.layer_stats(r.model)
    assert set(st) == {"conv", "dw", "logits"}  # the depthwise kernel too
    # Zero is one of the 8 values of a sparsity-preserving clustering.
    assert all(s.sparsity >= 0.49 and s.unique <= 8 for s in st.values()), st
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                   representative_data=x[:64])
    deployed = colopt.export.inspect_tflite(info.path)
    assert len(deployed) == 3 and all(w.dtype == "int8" for w in deployed)
    assert all(w.sparsity >= 0.49 and w.unique_per_channel_max <= 8 for w in deployed)
    acc = colopt.export.evaluate_tflite(info.path, xt, yt)
    assert acc > 0.5


# ------------------------------------------------------------------ one plain model.fit

def _digits_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8, 8, 1)),
                          keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
                          keras.layers.Flatten(name="flat"),
                          keras.layers.Dense(10, name="logits")])
    m.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


class _Seen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.steps, self.optimizers = [], 0, []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self.steps += 1
        if batch == 0:
            self.optimizers.append(id(self.model.optimizer))


def test_one_plain_fit_switches_phases_and_leaves_the_model_ready_to_export(digits, tmp_path):
    (x, y), (xt, yt) = digits
    model = _digits_model()
    seen = _Seen()
    co = colopt.callbacks.CollaborativeOptimization(
        [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=2),
         colopt.Cluster(clusters=8, epochs=1), colopt.Quantize(epochs=1)])
    h = model.fit(x, y, epochs=5, batch_size=64, validation_data=(xt, yt), verbose=0,
                  callbacks=[co, colopt.callbacks.CompressionMetrics(log_dir=tmp_path / "logs"),
                             seen])
    assert seen.epochs == [0, 1, 2, 3, 4] and h.epoch == [0, 1, 2, 3, 4]
    assert h.history["compression/sparsity"][0] == 0.0
    assert h.history["compression/sparsity"][-1] >= 0.49
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    # A fresh optimizer at each compressing phase (Prune at epoch 1, Cluster at 3, PCQAT at 4).
    o = seen.optimizers
    assert o[0] != o[1] == o[2] != o[3] != o[4]
    assert co.phase_label == "PCQAT"
    st = colopt.callbacks.layer_stats(model)  # the user's own model object
    assert all(s.sparsity >= 0.49 and s.unique_per_channel_max <= 8 for s in st.values()), st
    assert h.history["val_accuracy"][-1] > 0.5
    # Quantization-aware: int8 without calibration data.
    info = colopt.export.to_tflite(model, tmp_path / "m.tflite", quantization="int8")
    deployed = colopt.export.inspect_tflite(info.path)
    assert all(w.sparsity >= 0.49 and w.unique_per_channel_max <= 8 for w in deployed)


def test_plain_fit_with_mismatched_epochs_is_refused_before_the_first_step(digits):
    (x, y), _ = digits
    model = _digits_model()
    before = [w.copy() for w in model.get_weights()]
    seen = _Seen()
    co = colopt.callbacks.CollaborativeOptimization([colopt.Prune(sparsity=0.5, epochs=2),
                                                     colopt.Cluster(clusters=8, epochs=1)])
    with pytest.raises(ValueError, match=r"add up to 3 epoch\(s\).*runs epochs=5"):
        model.fit(x, y, epochs=5, batch_size=64, verbose=0, callbacks=[co, seen])
    assert seen.steps == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_plain_fit_of_a_tf_keras_model_is_refused_with_what_to_use(digits):
    from conftest import tiny_sequential

    (x, y), _ = digits
    co = colopt.callbacks.CollaborativeOptimization([colopt.Prune(sparsity=0.5, epochs=1)])
    with pytest.raises(TypeError, match="Use colopt.collaborative_fit"):
        tiny_sequential().fit(x, y, epochs=1, verbose=0, callbacks=[co])


def test_plain_fit_guard_catches_a_lost_mask(digits):
    (x, y), _ = digits
    model = _digits_model()

    class Tamper(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:  # the Cluster phase: its mask holds the pruned zeros
                layer = self.model.get_layer("logits")
                layer._colopt_mask.assign(np.ones(layer._colopt_mask.shape, "float32"))

    co = colopt.callbacks.CollaborativeOptimization([colopt.Prune(sparsity=0.5, epochs=2),
                                                     colopt.Cluster(clusters=8, epochs=1)])
    with pytest.raises(colopt.InvariantViolation, match="logits"):
        model.fit(x, y, epochs=3, batch_size=64, verbose=0, callbacks=[Tamper(), co])


def test_cluster_phase_trains_batchnorm_on_its_moving_statistics(digits):
    """As the tfmot engine (and tfmot's cluster_weights(model)) do: during Cluster, a
    BatchNormalization normalizes with its moving statistics, so the phase trains what the
    model computes at inference (the MobileNetV2 defect of issue 13)."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(i)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.999, name="bn")(h))
    o = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(h))
    model = keras.Model(i, o)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Prune(sparsity=0.5, epochs=1),
                                         colopt.Cluster(clusters=4, epochs=1)])
    bn = r.model.get_layer("bn")
    assert type(bn) is compress.MovingStatsBatchNormalization
    batch = x[:64]
    np.testing.assert_allclose(r.model(batch, training=True).numpy(),
                               r.model(batch, training=False).numpy(), rtol=1e-5, atol=1e-5)
    stats = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    r.model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), stats[0])
    # Stripped for export, it is a stock BatchNormalization computing the same.
    stripped = get_engine(r.model).strip(r.model)
    assert type(stripped.get_layer("bn")) is keras.layers.BatchNormalization
    np.testing.assert_allclose(stripped.predict(x, verbose=0), r.model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ quantization-aware training

def _bn_model():
    """Every kind of tensor QAT must range: a model input, convolutions with folded
    BatchNormalization and fused ReLU/ReLU6, a depthwise kernel, same-scale layers, a Dense
    with its own activation and logits."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv")(i)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)  # settles in few steps
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(h)
    h = keras.layers.ReLU(6.0, name="relu6")(h)
    h = keras.layers.Conv2D(32, 1, activation="relu", name="pw")(h)
    h = keras.layers.Flatten(name="flat")(keras.layers.MaxPooling2D(name="pool")(h))
    h = keras.layers.Dense(32, activation="relu", name="hidden")(h)
    model = keras.Model(i, keras.layers.Dense(10, name="logits")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _file_tensors(path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(path))
    it.allocate_tensors()
    out = []
    for t in it.get_tensor_details():
        try:
            out.append((t, it.get_tensor(t["index"])))
        except ValueError:  # an activation tensor: no data before a run
            out.append((t, None))
    return out


def test_pcqat_file_holds_exactly_the_trained_int8_weights(digits, tmp_path):
    (x, y), (xt, yt) = digits
    r = colopt.collaborative_fit(_bn_model(), x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Train(epochs=2),
                                         colopt.Prune(sparsity=0.5, epochs=2),
                                         colopt.Cluster(clusters=8, epochs=1),
                                         colopt.Quantize(epochs=1)])
    assert r.plan.phases[-1].label == "PCQAT"
    assert get_engine(r.model).is_qat(r.model)
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8")
    tensors = _file_tensors(info.path)
    # Fully int8: the float input and output only, no float op in between.
    floats = [t["name"] for t, _ in tensors if t["dtype"] == np.float32]
    assert len(floats) == 2, floats
    by_shape = {tuple(v.shape): v for t, v in tensors if v is not None and t["dtype"] == np.int8
                and len(t["quantization_parameters"]["scales"]) > 1}
    for name in ("conv", "dw", "pw", "hidden", "logits"):
        layer = r.model.get_layer(name)
        w = compress.effective_numpy(layer)  # on the fake-quant grid
        view = w.reshape(-1, compress.view_channels(layer))
        scale = np.abs(view).max(0) / 127
        trained = np.round(view / np.where(scale > 0, scale, 1)).astype(np.int64)
        stored = [v for v in by_shape.values() if v.size == view.size
                  and v.shape[-1 if name == "dw" else 0] == view.shape[1]]
        assert len(stored) == 1, (name, list(by_shape))
        q = stored[0]
        q = (q.reshape(-1, view.shape[1]) if name == "dw"
             else np.moveaxis(q, 0, -1).reshape(-1, view.shape[1])).astype(np.int64)
        # The converter folds each BN into its convolution: per channel, a scale (whose sign
        # may flip a channel), which symmetric per-channel int8 does not change.
        flips = np.all(q == -trained, axis=0) & np.any(trained != 0, axis=0)
        np.testing.assert_array_equal(np.where(flips, -q, q), trained, err_msg=name)
        assert np.mean(q == 0) >= 0.49, name
        assert max(len(np.unique(q[:, j])) for j in range(q.shape[1])) <= 8, name
    # The file computes what the Keras model computes.
    keras_pred = r.model.predict(xt, verbose=0).argmax(1)
    file_pred = colopt.export.predict_tflite(info.path, xt).argmax(1)
    assert np.mean(keras_pred == file_pred) >= 0.99
    assert colopt.export.evaluate_tflite(info.path, xt, yt) > 0.5


def _integer_pcqat_file(model, x, y, tmp_path):
    """`model` trained 2 epochs, then Prune 0.5 -> Cluster 8 -> PCQAT (1 each) and its int8
    file, which must hold no float tensor: (result, ExportInfo)."""
    model.fit(x, y, epochs=2, verbose=0)
    r = colopt.collaborative_fit(  # (the file's form is checked: no rate probe)
        model, x, y, batch_size=64, verbose=0, rate_policy="compiled", phases=[
            colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1), colopt.Quantize(epochs=1)])
    assert r.plan.phases[-1].label == "PCQAT"
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8")
    assert colopt.export.inner_float_tensors(info.path) == []
    return r, info


def _file_agrees_and_reloads(model, info, xt, tmp_path):
    """The int8 file predicts the QAT model's class on >= 95 % of 128 test inputs, and the
    model's `.keras` file loads back computing exactly the same."""
    ours, theirs = (colopt.export.predict_tflite(info.path, xt[:128]),
                    model.predict(xt[:128], verbose=0))
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.95
    model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(back.predict(xt[:32], verbose=0), theirs[:32])


def test_pcqat_embedding_table_is_the_files_gather_table(digits, tmp_path):
    """An Embedding's table is a GATHER's input, which LiteRT quantizes per tensor and
    asymmetrically: PCQAT fake-quantizes it on that grid, gives its token-id input no range,
    and the int8 file's table, dequantized, is the trained one: 8 values, the zeros kept,
    no float tensor, the file computing what the model computes."""
    (x, y), (xt, _) = digits
    x, xt = (np.rint(a.reshape(len(a), -1) * 16).astype("int32") for a in (x, xt))
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((64,), dtype="int32")
    h = L.Conv1D(16, 3, activation="relu", name="conv")(L.Embedding(17, 16, name="emb")(i))
    model = keras.Model(i, L.Dense(10, name="logits")(L.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r, info = _integer_pcqat_file(model, x, y, tmp_path)
    (table,) = [(t, v) for t, v in _file_tensors(info.path) if v is not None
                and tuple(v.shape) == (17, 16)]
    q = table[0]["quantization_parameters"]
    stored = (table[1].astype(np.float64) - q["zero_points"][0]) * q["scales"][0]
    trained = compress.effective_numpy(r.model.get_layer("emb"))
    np.testing.assert_allclose(stored, trained, atol=1e-6)
    assert np.mean(trained == 0) >= 0.49 and np.unique(trained).size <= 8
    np.testing.assert_allclose(colopt.export.predict_tflite(info.path, xt[:64]),
                               r.model.predict(xt[:64], verbose=0), atol=1e-4)


def _einsum_model(q_bias=None):
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.EinsumDense("abc,cde->abde", (8, 2, 4), bias_axes=q_bias, activation="relu",
                      name="q")(L.Reshape((8, 8))(i))
    h = L.EinsumDense("abde,dec->abc", (8, 6), bias_axes="c", name="o")(h)
    h = L.EinsumDense("abc,dc->abd", (8, 6), name="t")(h)
    model = keras.Model(i, L.Dense(10, name="logits")(L.Flatten()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_pcqat_einsum_dense_runs_as_int8_fully_connected_ops(digits, tmp_path):
    """EinsumDense layers whose FULLY_CONNECTED takes the bias ('o'), that have none ('t'),
    and whose bias LiteRT adds after a RESHAPE, in an ADD of its own ('q', bias on two output
    axes: the tensor before that ADD is ranged too): PCQAT keeps each one's zeros and
    clusters in the int8 file, with no float tensor, and the file computes what the model
    computes."""
    (x, y), (xt, _) = digits
    model = _einsum_model(q_bias="de")
    r, info = _integer_pcqat_file(model, x, y, tmp_path)
    assert r.model.get_layer("q")._colopt_inner is not None  # the range before the bias
    held = {colopt.export.layer_of(w.name, ["q", "o", "t", "logits"]): w
            for w in colopt.export.inspect_tflite(info.path)}
    for name in ("q", "o", "t"):
        w = held[name]
        assert w.op == "FULLY_CONNECTED" and w.dtype == "int8", name
        assert w.sparsity >= 0.49 and w.unique_per_channel_max <= 8, (name, w)
    ours, theirs = (colopt.export.predict_tflite(info.path, xt[:128]),
                    r.model.predict(xt[:128], verbose=0))
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.95


def test_pcqat_transformer_block_runs_fully_integer(digits, tmp_path):
    """A pre-norm transformer block (the digits' rows as 8 tokens): LayerNormalization, whose
    stock conversion keeps a float NEG, runs as int8 MEAN/SUB/MUL/RSQRT ops; the attention's
    matmuls and softmax, its projections (query/key/value with the bias after a RESHAPE) and
    the gelu MLP on a sequence (Dense: the bias after a RESHAPE too) are int8. No float
    tensor, every kernel pruned and clustered in the file, the file computing what the model
    computes; the model saves, loads and strips to stock layers."""
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.Dense(16, name="embed")(L.Reshape((8, 8))(i))
    n = L.LayerNormalization(name="ln1")(h)
    h = L.Add()([h, L.MultiHeadAttention(2, 8, name="mha")(n, n)])
    n = L.LayerNormalization(name="ln2")(h)
    h = L.Add()([h, L.Dense(16, name="mlp2")(L.Dense(32, activation="gelu", name="mlp1")(n))])
    model = keras.Model(i, L.Dense(10, name="logits")(L.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r, info = _integer_pcqat_file(model, x, y, tmp_path)
    names = ["embed", "mha/query", "mha/key", "mha/value", "mha/attention_output", "mlp1",
             "mlp2", "logits"]
    held = {colopt.export.layer_of(w.name, names): w
            for w in colopt.export.inspect_tflite(info.path)}
    assert set(held) == set(names)
    for name, w in held.items():
        assert w.dtype == "int8" and w.sparsity >= 0.49 and w.unique_per_channel_max <= 8, w
    _file_agrees_and_reloads(r.model, info, xt, tmp_path)
    plain = colopt.strip(r.model)
    assert type(plain.get_layer("mha")) is L.MultiHeadAttention
    assert type(plain.get_layer("ln1")) is L.LayerNormalization


def test_quantize_refuses_attention_and_normalization_it_cannot_run(digits):
    """A causal MultiHeadAttention (its mask is a float SELECT in LiteRT, not trained for yet)
    and an RMS LayerNormalization: both refused before training, by name and why."""
    (x, y), _ = digits
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.LayerNormalization(rms_scaling=True, name="rms")(L.Reshape((8, 8))(i))
    h = L.MultiHeadAttention(2, 4, name="mha")(h, h, use_causal_mask=True)
    model = keras.Model(i, L.Dense(10)(L.Flatten()(h)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    seen = _Seen()
    with pytest.raises(ValueError, match=r"\['rms \(LayerNormalization: rms_scaling\)', "
                                         r"'mha \(MultiHeadAttention: called with "
                                         r"use_causal_mask\)'\].*post-training"):
        colopt.collaborative_fit(model, x, y, verbose=0, callbacks=[seen], phases=[
            colopt.Prune(0.5, epochs=1), colopt.Quantize(epochs=1)])
    assert seen.steps == 0


def _recurrent_model(rnn, timesteps=8):
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((timesteps, 8))
    h = rnn(name="rnn")(i)
    model = keras.Model(i, L.Dense(10, name="logits")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_quantize_refuses_a_recurrent_layer_naming_the_post_training_path(digits):
    """LiteRT has no int8 recurrent loop to train toward: an LSTM and a Bidirectional GRU are
    refused by name before training, with what works."""
    (x, y), _ = digits
    x = x.reshape(-1, 8, 8)
    L = keras.layers
    for rnn, named in ((lambda name: L.LSTM(8, name=name), "rnn (LSTM: "),
                       (lambda name: L.Bidirectional(L.GRU(4), name=name),
                        "rnn (Bidirectional: ")):
        seen = _Seen()
        with pytest.raises(ValueError, match=re.escape(named) + r".*unrolled.*post-training"):
            colopt.collaborative_fit(_recurrent_model(rnn), x, y, verbose=0, callbacks=[seen],
                                     phases=[colopt.Prune(0.5, epochs=1),
                                             colopt.Quantize(epochs=1)])
        assert seen.steps == 0


def test_int8_export_of_a_recurrent_loop_converts_it_unrolled(digits, tmp_path, caplog):
    """LiteRT's int8 converter crashes the process on a recurrent layer's WHILE loop: the
    export converts a copy unrolled over the fixed timesteps (said in the log), whose file is
    integer FULLY_CONNECTED per timestep and computes what the model computes; the user's
    model keeps its loop. Float export keeps the loop (a WHILE, converted at batch 1). A
    sequence of any length cannot be unrolled: a clear error, before the converter runs."""
    (x, y), (xt, _) = digits
    x, xt = x.reshape(-1, 8, 8), xt.reshape(-1, 8, 8)
    model = _recurrent_model(lambda name: keras.layers.GRU(8, name=name))
    model.fit(x, y, epochs=2, verbose=0)
    with caplog.at_level(logging.INFO, logger="keras_colopt"):
        info = colopt.export.to_tflite(model, tmp_path / "m.tflite", quantization="int8",
                                       representative_data=x[:64], io="int8")
    assert "recurrent layer(s) ['rnn'] converted unrolled" in caplog.text
    assert model.get_layer("rnn").unroll is False
    assert colopt.export.inner_float_tensors(info.path) == []
    assert "WHILE" not in colopt.export.operators(info.path)
    ours, theirs = (colopt.export.predict_tflite(info.path, xt[:128]),
                    model.predict(xt[:128], verbose=0))
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.95
    fp = colopt.export.to_tflite(model, tmp_path / "f.tflite", quantization="none")
    assert "WHILE" in colopt.export.operators(fp.path)
    # Both kernels found in the file: in the WHILE's body, and in the int8 file unrolled.
    kernels = colopt.callbacks.effective_kernels(model)
    for path in (fp.path, info.path):
        assert {"rnn/kernel", "rnn/recurrent_kernel"} <= set(
            colopt.export.layers_of(path, kernels)), path
    np.testing.assert_allclose(colopt.export.predict_tflite(fp.path, xt[:8]),
                               model.predict(xt[:8], verbose=0), atol=1e-4)
    free = _recurrent_model(lambda name: keras.layers.LSTM(8, name=name), timesteps=None)
    with pytest.raises(ValueError, match=r"\['rnn'\] take sequences of any length.*"
                                         r"keras.Input\(\(timesteps, features\)\)"):
        colopt.export.to_tflite(free, tmp_path / "x.tflite", quantization="int8",
                                representative_data=x[:8])


def test_a_recurrent_model_resumes_its_pruning_on_schedule(digits, tmp_path):
    """Stopped in the middle of a Prune phase and resumed from its checkpoint, an LSTM's
    pruning goes on from its step (the state of the cell's kernel parts is in the
    checkpoint), and the run ends as an uninterrupted one does. (Without them in it, the
    resumed parts started their schedule again from the phase's entry.)"""
    (x, y), _ = digits
    x, y = x[:128].reshape(-1, 8, 8), y[:128]

    def fit(ckpt, callbacks=()):
        return colopt.collaborative_fit(
            _recurrent_model(lambda name: keras.layers.LSTM(8, name=name)), x, y,
            phases=[colopt.Prune(sparsity=0.6, epochs=3)], batch_size=64, verbose=0,
            shuffle=False, checkpoint_dir=ckpt, callbacks=list(callbacks))

    class StopAt1(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.model.stop_training = True

    whole = fit(tmp_path / "whole")
    assert fit(tmp_path / "cut", [StopAt1()]).history.epoch == [0]
    resumed = fit(tmp_path / "cut")
    assert resumed.resumed_at == 1
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _hard_swish_model(chained=False):
    """MobileNetV3's hard-swish and squeeze-excite as Keras writes them: keras.ops arithmetic
    on tensors (`h + 3.0`), which are operations of the graph, not layers."""
    keras.utils.set_random_seed(0)
    L = keras.layers

    def hard_sigmoid(h):
        return L.ReLU(6.0)(h + 3.0) * (1.0 / 6.0)
    i = keras.Input((8, 8, 1))
    h = L.BatchNormalization()(L.Conv2D(8, 3, use_bias=False, name="conv")(i))
    h = L.Multiply()([h, hard_sigmoid(h)])
    s = L.Conv2D(8, 1, activation="relu")(L.GlobalAveragePooling2D(keepdims=True)(h))
    s = L.Conv2D(8, 1)(s)
    h = L.Multiply()([h, hard_sigmoid(s * 2.0 if chained else s)])
    model = keras.Model(i, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_qat_ranges_what_keras_ops_compute_on_the_layer_that_reads_it(digits, tmp_path):
    """`h + 3.0` and `x * (1/6)` are keras.ops operations with no variables: the layer that
    reads one takes a range on that input (a Multiply on its second), so the int8 file is
    integer throughout and computes what the QAT model computes; the ranges survive .keras.
    (Without them LiteRT kept those ADD and MUL operators in float: a MobileNetV3's QAT file
    had 37 float tensors.)"""
    (x, y), (xt, _) = digits
    model = _hard_swish_model()
    model.fit(x, y, epochs=2, verbose=0)
    r = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Quantize(epochs=1)])
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8")
    assert colopt.export.inner_float_tensors(info.path) == []
    ours, theirs = (colopt.export.predict_tflite(info.path, xt[:128]),
                    r.model.predict(xt[:128], verbose=0))
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.95
    r.model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(back.predict(xt[:32], verbose=0),
                                  r.model.predict(xt[:32], verbose=0))


def test_quantize_refuses_keras_ops_it_cannot_range(digits):
    """`(s * 2.0) + 3.0`: the product is read by another operation, which has nowhere to keep
    a range; `x * 2.0` on a model input leaves the input without one: both refused before
    training, naming the operation."""
    (x, y), _ = digits
    seen = _Seen()
    with pytest.raises(ValueError, match=r"does not know how LiteRT quantizes the layer\(s\) "
                                         r"\['multiply(_\d+)? \(keras.ops Multiply\)'\]"):
        colopt.collaborative_fit(_hard_swish_model(chained=True), x, y, verbose=0,
                                 callbacks=[seen], phases=[colopt.Quantize(epochs=1)])
    assert seen.steps == 0
    # On a model input: the input itself would get no range.
    i = keras.Input((8, 8, 1))
    model = keras.Model(i, keras.layers.Dense(10)(keras.layers.Flatten()(i * 2.0)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"\['multiply(_\d+)? \(keras.ops Multiply\)'\]"):
        colopt.collaborative_fit(model, x, y, verbose=0, callbacks=[seen],
                                 phases=[colopt.Quantize(epochs=1)])
    assert seen.steps == 0


def test_qat_model_saves_and_loads_with_its_ranges(digits, tmp_path):
    (x, y), (xt, _) = digits
    r = colopt.collaborative_fit(_bn_model(), x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Prune(sparsity=0.5, epochs=1),
                                         colopt.Quantize(epochs=1)])
    r.model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(back.predict(xt, verbose=0), r.model.predict(xt, verbose=0),
                               atol=1e-5)
    ranges = {l.name: l._colopt_out.numpy() for l in r.model.layers
              if getattr(l, "_colopt_out", None) is not None}
    assert {"relu", "relu6", "pw", "hidden", "logits"} <= set(ranges)
    for name, value in ranges.items():
        np.testing.assert_array_equal(back.get_layer(name)._colopt_out.numpy(), value)
    # Training the loaded model keeps the pruned zeros.
    back.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert np.mean(compress.effective_numpy(back.get_layer("hidden")) == 0) >= 0.49


def test_quantize_refuses_a_layer_it_cannot_range_before_training(digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = keras.layers.GroupNormalization(4, name="norm")(keras.layers.Conv2D(8, 3, name="conv")(i))
    model = keras.Model(i, keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(h)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    seen = _Seen()
    with pytest.raises(ValueError, match=r"does not know how LiteRT quantizes the layer\(s\) "
                                         r"\['norm'\].*GroupNormalization.*post-training"):
        colopt.collaborative_fit(model, x, y, verbose=0, callbacks=[seen],
                                 phases=[colopt.Prune(sparsity=0.5, epochs=1),
                                         colopt.Quantize(epochs=1)])
    assert seen.steps == 0


def test_qat_ranges_the_input_of_an_activation_litert_runs_on_its_own(digits, tmp_path):
    """Dense(activation="softmax"): LiteRT runs FULLY_CONNECTED then SOFTMAX, so the logits
    between them need a range too, or the file would keep a float op."""
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)),
                              keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
                              keras.layers.GlobalAveragePooling2D(name="gap"),
                              keras.layers.Dense(10, activation="softmax", name="probs")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    r = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Train(epochs=1), colopt.Quantize(epochs=1)])
    assert r.model.get_layer("probs")._colopt_pre is not None
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8")
    floats = [t["name"] for t, _ in _file_tensors(info.path) if t["dtype"] == np.float32]
    assert len(floats) == 2, floats
    np.testing.assert_allclose(colopt.export.predict_tflite(info.path, xt[:32]),
                               r.model.predict(xt[:32], verbose=0), atol=0.02)


def test_qat_runs_normalization_in_int8_with_the_tensor_between_its_two_ops_ranged(
        digits, tmp_path):
    """A Normalization (EfficientNet's preprocessing; here also mid-network) runs in LiteRT as
    SUB then MUL: with a range on the tensor between them the int8 file keeps no float
    tensor, and computes what the QAT model computes; the ranges survive a `.keras` file."""
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.Normalization(axis=-1, mean=100., variance=900., name="pre")(L.Rescaling(255.)(i))
    h = L.Conv2D(8, 3, activation="relu", name="conv")(h)
    h = L.Normalization(axis=-1, mean=np.linspace(0, 1, 8), variance=np.linspace(1, 2, 8),
                        name="mid")(h)
    model = keras.Model(i, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    r = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0,
                                 phases=[colopt.Quantize(epochs=1)])
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8")
    assert colopt.export.inner_float_tensors(info.path) == []
    ops = colopt.export.operators(info.path)
    assert ops.count("SUB") == 2 and ops.count("DEQUANTIZE") == 1, ops
    ours, theirs = (colopt.export.predict_tflite(info.path, xt[:128]),
                    r.model.predict(xt[:128], verbose=0))
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.9
    assert np.abs(ours - theirs).max() <= 0.03 * np.abs(theirs).max()
    r.model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    for name in ("pre", "mid"):
        np.testing.assert_array_equal(back.get_layer(name)._colopt_pre.numpy(),
                                      r.model.get_layer(name)._colopt_pre.numpy())


def test_our_callbacks_leave_keras3_batch_hooks_asynchronous(tmp_path, monkeypatch):
    """On a thread-safe backend (JAX) Keras 3 syncs every step's logs when a callback
    overrides a batch-end hook: ours do not, and a user's subclass that does override one is
    still called on every step."""
    from keras.src import backend
    from keras.src.callbacks.callback_list import CallbackList

    monkeypatch.setattr(backend, "IS_THREAD_SAFE", True)
    ours = [colopt.callbacks.CompressionMetrics(log_dir=str(tmp_path)),
            colopt.callbacks.InvariantGuard(),
            colopt.callbacks.CollaborativeOptimization([colopt.Prune(sparsity=0.5, epochs=1)])]
    assert CallbackList(ours, model=_model())._async_train

    from keras_colopt.engines.base import Callback

    class Counting(Callback):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

    counting = Counting()
    assert not CallbackList(ours + [counting], model=_model())._async_train
    x, y = _data()
    _model().fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[counting])
    assert counting.steps == 4


def test_under_another_backend_int8_export_and_distillation_are_refused_before_work(
        digits, tmp_path, monkeypatch):
    """Under JAX (benchmarks/jax_backend.py trains there) the converter would get the
    fake-quant as float arithmetic (no int8 weights) and the distilling step would not run:
    both are refused with what to do, before any file is written or any step is taken."""
    x, y = digits[0]
    m = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Conv2D(4, 3, name="conv"),
                          keras.layers.Flatten(), keras.layers.Dense(10, name="dense")])
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    before = [w.copy() for w in m.get_weights()]
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        colopt.export.to_tflite(m, tmp_path / "m.tflite", quantization="int8",
                                representative_data=x[:32])
    assert not (tmp_path / "m.tflite").exists()
    with pytest.raises(RuntimeError, match="Distillation is not available under Keras' 'jax'"):
        colopt.collaborative_fit(m, x[:64], None, distill=True, verbose=0,
                                 phases=[colopt.Prune(sparsity=0.5, epochs=1)])
    for a, b in zip(before, m.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_decay_cosine_in_collaborative_fit_and_in_one_plain_fit(digits):
    """The Keras 3 engine takes a phase's cosine like the tfmot engine (test_fit), inside
    collaborative_fit and when CollaborativeOptimization switches phases in one fit."""
    (x, y), _ = digits
    x, y = x[:256], y[:256]

    class Steps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates = []

        def on_train_batch_begin(self, batch, logs=None):
            opt = self.model.optimizer
            self.rates.append(float(opt._learning_rate(opt.iterations)
                                    if callable(opt._learning_rate) else opt.learning_rate))

    def model():
        m = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(10, name="dense")])
        m.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    def phases():
        return [colopt.Prune(sparsity=0.5, epochs=2, decay="cosine"),
                colopt.Cluster(clusters=4, epochs=1, learning_rate=2e-3, decay="cosine")]

    steps = 256 // 32
    cosine = (lambda start, total:
              [start * (1 + np.cos(np.pi * k / total)) / 2 for k in range(total)])
    expected = cosine(1e-2, 2 * steps) + cosine(2e-3, steps)
    rec = Steps()
    colopt.collaborative_fit(model(), x, y, phases=phases(), batch_size=32, verbose=0,
                             callbacks=[rec], rate_policy="compiled")
    np.testing.assert_allclose(rec.rates, expected, rtol=1e-4)
    rec, m = Steps(), model()  # the drop-in, without probe_data: the compiled rate
    m.fit(x, y, epochs=3, batch_size=32, verbose=0,
          callbacks=[colopt.callbacks.CollaborativeOptimization(phases()), rec])
    np.testing.assert_allclose(rec.rates, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="Train phase trains with your compiled optimizer"):
        model().fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[
            colopt.callbacks.CollaborativeOptimization([colopt.Train(epochs=1, decay="cosine"),
                                                        colopt.Prune(epochs=1)])])


def test_activation_range_takes_the_first_batch_then_a_moving_average():
    # LiteRT's int8 range of an activation: the first training batch's (min <= 0 <= max),
    # then 0.999 * range + 0.001 * the batch's (tfmot's MovingAverageQuantizer); inference
    # reads it and leaves it as it is.
    var = keras.Variable(np.array(compress.INITIAL_RANGE, "float32"), trainable=False)
    compress.fake_quant_range(np.array([[1.0, 2.0, 4.0]], "float32"), var, training=True)
    np.testing.assert_allclose(var.numpy(), [0.0, 4.0, 1.0])  # min clamped up to 0
    compress.fake_quant_range(np.array([[-2.0, 8.0]], "float32"), var, training=True)
    np.testing.assert_allclose(var.numpy(), [0.999 * 0 + 0.001 * -2, 0.999 * 4 + 0.001 * 8,
                                             1.0], rtol=1e-6)
    before = var.numpy().copy()
    y = compress.fake_quant_range(np.array([[-100.0, 100.0]], "float32"), var, training=False)
    np.testing.assert_array_equal(var.numpy(), before)
    np.testing.assert_allclose(np.asarray(y), [[before[0], before[1]]], atol=0.02)


def test_a_run_logs_no_tensorflow_warning_about_our_kernel_reads(caplog):
    # The callbacks read each layer's effective kernel through a function traced once per
    # layer and compression state; TensorFlow counts those traces together and, unsilenced,
    # told the user of "retracing" (and AutoGraph of source it could not parse).
    x, y = _data()
    with caplog.at_level("WARNING", logger="tensorflow"):
        colopt.collaborative_fit(_model(), x, y, batch_size=16, verbose=0, phases=[
            colopt.Prune(sparsity=0.5, epochs=1), colopt.Cluster(clusters=4, epochs=1),
            colopt.Quantize(epochs=1)])
    noisy = [m for m in caplog.messages if "retracing" in m or "AutoGraph" in m]
    assert not noisy, noisy


def _drop_in_plan():
    return [colopt.Prune(sparsity=0.5, epochs=2, schedule="constant"),
            colopt.Cluster(clusters=4, epochs=1)]


def test_drop_in_started_inside_the_plan_on_a_model_without_its_compression_is_refused():
    """fit(initial_epoch=2) on a plain model: the Prune phase before epoch 2 was never
    applied. Refused before the first step, weights untouched."""
    x, y = _data()
    m = _model()
    before = [w.copy() for w in m.get_weights()]
    with pytest.raises(ValueError, match="carries no prune compression"):
        m.fit(x, y, epochs=3, initial_epoch=2, batch_size=16, verbose=0,
              callbacks=[colopt.callbacks.CollaborativeOptimization(_drop_in_plan())])
    assert all(np.array_equal(a, b) for a, b in zip(before, m.get_weights()))


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt("pre-empted")


@pytest.mark.parametrize("stop_after", [0, 1])  # inside Prune; at the Prune -> Cluster switch
def test_drop_in_resumed_with_initial_epoch_goes_on_from_where_the_model_stands(stop_after):
    """The same model object after an interrupted fit, fit again from the next epoch: the
    phases already applied are verified on it, the plan goes on (the Cluster phase is
    applied at its epoch), and the guard checks the phase it resumed in."""
    x, y = _data()
    m = _model()
    with pytest.raises(KeyboardInterrupt):
        m.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[
            colopt.callbacks.CollaborativeOptimization(_drop_in_plan()), _StopAfter(stop_after)])
    cb = colopt.callbacks.CollaborativeOptimization(_drop_in_plan())
    m.fit(x, y, epochs=3, initial_epoch=stop_after + 1, batch_size=16, verbose=0,
          callbacks=[cb])
    for layer in m.layers:
        if compress.is_compressed(layer):
            k = compress.effective_numpy(layer)
            assert np.mean(k == 0) >= 0.49 and np.unique(k).size <= 5, layer.name
    assert cb.phase_label == "Cluster (sparsity-preserving)"
    assert cb._guard is not None and cb._guard.violations == []


def test_drop_in_restarts_the_best_of_its_sibling_callbacks_at_each_phase(digits, tmp_path):
    """ModelCheckpoint(save_best_only=True) and EarlyStopping(restore_best_weights=True) given
    to the same fit as the drop-in callback: each phase starts their best again, so the last
    file written and the weights restored come from the pruned phase, not from the
    uncompressed Train epoch that had the best loss of the run."""
    from conftest import compile_

    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits")]), keras=keras)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)  # a low loss the Prune phase won't beat
    model.optimizer.learning_rate.assign(1e-4)
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "best-{epoch}.weights.h5"),
                                           monitor="loss", save_best_only=True,
                                           save_weights_only=True)
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    drop_in = colopt.callbacks.CollaborativeOptimization(
        [colopt.Train(epochs=1), colopt.Prune(sparsity=0.8, epochs=2, schedule="constant",
                                              learning_rate=1e-5)])
    h = model.fit(x, y, epochs=3, batch_size=32, verbose=0,
                  callbacks=[ckpt, drop_in, stop]).history
    assert h["loss"][0] < min(h["loss"][1:])  # the Train epoch was the best of the run
    written = sorted(int(p.name.split("-")[1].split(".")[0]) for p in tmp_path.glob("best-*"))
    assert written[0] == 1 and written[-1] >= 2, written  # the Prune phase wrote its best
    assert ckpt.best == pytest.approx(min(h["loss"][1:]))
    stats = colopt.callbacks.layer_stats(model)
    assert all(s.sparsity >= 0.79 for s in stats.values()), stats  # restored: a pruned epoch


_SUBCLASSES = '''
import keras


@keras.saving.register_keras_serializable(package="mine")
class ScaledDense(keras.layers.Dense):
    """A KerasHub-style subclass: its own call and config, reading self.kernel."""

    def __init__(self, units, scale=2.0, **kwargs):
        super().__init__(units, **kwargs)
        self.scale = scale

    def call(self, x):
        return super().call(x) * self.scale

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="mine")
class RawDense(keras.layers.Dense):
    """Computes with the raw variable: compressing `kernel` would change nothing it computes."""

    def call(self, x):
        return keras.ops.relu(keras.ops.matmul(x, self._kernel) + self.bias)
'''

_LOAD_ELSEWHERE = '''
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import keras
import keras_colopt  # noqa: F401 (registers the engine's classes, as any user of it has)
import subclasses  # noqa: F401 (the user's own classes, which their model needs anyway)
back = keras.models.load_model(sys.argv[2])
np.save(sys.argv[3], back.predict(np.load(sys.argv[4]), verbose=0))
print(type(back.get_layer("scaled")).__qualname__)
'''


def test_a_subclass_that_computes_with_its_kernel_is_compressed_and_loads_elsewhere(
        digits, tmp_path, caplog, monkeypatch):
    """A user's subclass of Dense with its own call and config is pruned and clustered like a
    Dense, and its `.keras` file loads in a new process that imports only keras_colopt and
    the user's module. A subclass computing with the raw variable is named in the log and
    left as it is (its kernel is not touched), not reported as compressed."""
    import subprocess
    import sys
    (x, y), (xt, _) = digits
    (tmp_path / "subclasses.py").write_text(_SUBCLASSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import subclasses
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = subclasses.ScaledDense(32, activation="relu", name="scaled")(keras.layers.Flatten()(i))
    h = subclasses.RawDense(32, name="raw")(h)
    model = keras.Model(i, keras.layers.Dense(10, name="logits")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    raw_before = model.get_layer("raw").get_weights()[0]
    r = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0, phases=[
        colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)])
    assert r.skipped["Prune"] == ["raw"]
    assert "raw (RawDense) subclasses Dense, but its call does not compute with `kernel`" \
        in caplog.text
    scaled = r.model.get_layer("scaled")
    assert isinstance(scaled, subclasses.ScaledDense) and scaled.scale == 2.0
    w = compress.effective_numpy(scaled)
    assert np.mean(w == 0) >= 0.49 and np.unique(w).size <= 8
    assert r.model.get_layer("raw").trainable  # not held by a phase it was never in
    assert np.mean(r.model.get_layer("raw").get_weights()[0] == 0) < 0.01
    assert not np.array_equal(r.model.get_layer("raw").get_weights()[0], raw_before)
    r.model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", xt[:32])
    script = tmp_path / "load.py"
    script.write_text(_LOAD_ELSEWHERE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "m.keras"),
                          str(tmp_path / "p.npy"), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "compressible.ScaledDense"
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"),
                               r.model.predict(xt[:32], verbose=0), atol=1e-6)


def test_qat_layer_norm_saturates_a_small_variance_as_litert_does():
    """Tokens of very different variances (the first layer norm of a keyword transformer):
    on the int8 grid a small variance rounds to 0, whose rsqrt LiteRT saturates at the top of
    its output range. That range is calibrated on the exact rsqrt, 1/sqrt(the least variance
    + epsilon); observed on the rounded variance it reached 1/sqrt(epsilon), and the QAT
    model scaled such a token ~30x (the KWT's PCQAT loss was 8,000 from its first step)."""
    from keras_colopt.engines.keras3 import quantize
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, s, (64, 16)) for s in (10.0, 0.1, 1.0)], 1).astype("float32")
    layer = keras.layers.LayerNormalization(epsilon=1e-3)
    exact = np.asarray(layer(x))
    quantize.observe(layer, False, True)
    for _ in range(3):
        out = np.asarray(layer(x, training=True))
    top = layer._colopt_inner.numpy()[5, 1]  # the rsqrt's range: (min, max, seen)
    least = x.var(-1).min()
    assert top <= 1.01 / np.sqrt(least + 1e-3), (top, least)
    # The small-variance tokens come out on the float layer's scale, not ~30x it.
    assert np.abs(out[:, 1]).mean() < 2 * np.abs(exact[:, 1]).mean()


def test_pcqat_separable_conv_runs_as_int8_depthwise_then_pointwise(digits, tmp_path):
    """SeparableConv2D (with a fused relu; with a BatchNormalization folded into it; with a
    swish LiteRT runs on its own): PCQAT computes it as the file does, DEPTHWISE_CONV_2D, the
    tensor between ranged, then the 1x1 CONV_2D, each kernel pruned and clustered by its own
    class's rules. No float tensor; the file computes what the model computes."""
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.SeparableConv2D(8, 3, depth_multiplier=2, activation="relu", name="a")(
        L.Conv2D(4, 1, name="pw")(i))
    h = L.Activation("swish")(L.BatchNormalization()(L.SeparableConv2D(
        8, 3, padding="same", name="b")(h)))
    h = L.SeparableConv2D(8, 3, activation="swish", name="c")(h)
    model = keras.Model(i, L.Dense(10, name="logits")(L.Flatten()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r, info = _integer_pcqat_file(model, x, y, tmp_path)
    names = [f"{s}/{k}" for s in "abc" for k in ("depthwise", "pointwise")]
    held = {colopt.export.layer_of(w.name, names + ["pw", "logits"]): w
            for w in colopt.export.inspect_tflite(info.path)}
    for name in names:
        w = held[name]
        assert w.op == ("DEPTHWISE_CONV_2D" if "depth" in name else "CONV_2D"), (name, w)
        assert w.dtype == "int8" and w.sparsity >= 0.49 and w.unique_per_channel_max <= 8, w
    _file_agrees_and_reloads(r.model, info, xt, tmp_path)


def test_pcqat_one_dimensional_depthwise_and_separable_convs_run_in_int8(digits, tmp_path):
    """DepthwiseConv1D and SeparableConv1D (a keyword spotter's 1-D DS-CNN blocks, the digits'
    rows as 8 frames): LiteRT runs them as DEPTHWISE_CONV_2D and 1x1 CONV_2D of one row;
    PCQAT computes them so. No float tensor, every kernel compressed in the file, the file
    computing what the model computes."""
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.Conv1D(8, 1, activation="relu", name="pw")(L.Reshape((8, 8))(i))
    h = L.DepthwiseConv1D(5, padding="same", depth_multiplier=2, activation="relu",
                          name="dw")(h)
    h = L.SeparableConv1D(8, 5, padding="same", activation="swish", name="sep")(h)
    model = keras.Model(i, L.Dense(10, name="logits")(L.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r, info = _integer_pcqat_file(model, x, y, tmp_path)
    kernels = colopt.callbacks.effective_kernels(r.model)
    weights = colopt.export.inspect_tflite(info.path)
    held = dict(zip(colopt.export.layers_of(info.path, kernels), weights))
    for name, op in (("dw", "DEPTHWISE_CONV_2D"), ("sep/depthwise", "DEPTHWISE_CONV_2D"),
                     ("sep/pointwise", "CONV_2D")):
        w = held[name]
        assert w.op == op and w.dtype == "int8", (name, w)
        assert w.sparsity >= 0.49 and w.unique_per_channel_max <= 8, (name, w)
    _file_agrees_and_reloads(r.model, info, xt, tmp_path)


def test_pcqat_transposed_convolutions_run_as_int8_transpose_conv(digits, tmp_path):
    """Conv2DTranspose and Conv1DTranspose (an upsampling decoder's layers): PCQAT ranges them
    like a convolution and puts their kernels on the per-output-channel grid of LiteRT's
    TRANSPOSE_CONV, whose output channels are the kernel's second-to-last axis. No float
    tensor, zeros and clusters kept per channel, the file computing what the model computes."""
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    L = keras.layers
    i = keras.Input((8, 8, 1))
    h = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down")(i)
    h = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(h)
    h1 = L.Conv1DTranspose(6, 3, strides=2, padding="same", name="up1")(L.Reshape((8, 8))(i))
    model = keras.Model(i, L.Dense(10, name="logits")(
        L.Concatenate()([L.Flatten()(h), L.Flatten()(h1)])))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    r, info = _integer_pcqat_file(model, x, y, tmp_path)
    held = {colopt.export.layer_of(w.name, ["down", "up", "up1", "logits"]): w
            for w in colopt.export.inspect_tflite(info.path)}
    for name in ("up", "up1"):
        w = held[name]
        assert w.op == "TRANSPOSE_CONV" and w.dtype == "int8" and w.per_channel_quantized, w
        assert w.sparsity >= 0.49 and w.unique_per_channel_max <= 8, w
    _file_agrees_and_reloads(r.model, info, xt, tmp_path)
