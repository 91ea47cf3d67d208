"""colopt.strip: the user's architecture, stock layers, the compression baked in."""

import numpy as np
import pytest

import keras_colopt as colopt
from keras_colopt import stats

from conftest import compile_


def _k3_model():
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8, 8, 1)),
                          keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
                          keras.layers.Flatten(name="flat"),
                          keras.layers.Dense(16, activation="relu", name="hidden"),
                          keras.layers.Dense(10, name="logits")])
    return compile_(m, keras=keras)


@pytest.mark.parametrize("quantize", [False, True])
def test_keras3_strip_gives_stock_layers_with_the_compression_in_get_weights(
        digits, tmp_path, quantize):
    import keras

    (x, y), (xt, yt) = digits
    phases = [colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)]
    if quantize:
        phases.append(colopt.Quantize(epochs=1))
    result = colopt.collaborative_fit(_k3_model(), x, y, phases=phases, batch_size=64,
                                      verbose=0, rate_policy="compiled")
    plain = colopt.strip(result.model)
    assert all(type(l).__module__.startswith("keras.") for l in plain.layers)
    for layer in plain.layers:
        for w in layer.get_weights():
            if w.ndim >= 2:  # the zeros and at most 8 values per output channel, as deployed
                assert np.mean(w == 0) >= 0.49, layer.name
                assert stats.unique_values(w, axis=-1).max() <= 8, layer.name
    # The user's own architecture takes the weights, and computes like the compressed model.
    mine = _k3_model()
    mine.set_weights(plain.get_weights())
    want = result.model.predict(xt, verbose=0)
    got = mine.predict(xt, verbose=0)
    if quantize:  # activation ranges gone: the same argmax almost everywhere
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # save_weights/load_weights, model.save, and Keras 3's own LiteRT export work as for any model.
    plain.save_weights(tmp_path / "w.weights.h5")
    fresh = _k3_model()
    fresh.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_allclose(fresh.predict(xt, verbose=0), got, rtol=1e-5, atol=1e-5)
    plain.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert all(type(l).__module__.startswith("keras.") for l in loaded.layers)
    plain.export(str(tmp_path / "m.tflite"), format="litert")
    assert (tmp_path / "m.tflite").stat().st_size > 0
    # the result itself is untouched
    assert any(type(l).__module__.startswith("keras_colopt") for l in result.model.layers)


def test_tfmot_strip_of_a_clustered_model(digits):
    from conftest import tiny_sequential

    (x, y), _ = digits
    result = colopt.collaborative_fit(
        tiny_sequential(), x, y, batch_size=64, verbose=0,
        phases=[colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)])
    plain = colopt.strip(result.model)
    mine = tiny_sequential()
    mine.set_weights(plain.get_weights())
    kernels = [w for w in mine.get_weights() if w.ndim >= 2]
    assert kernels and all(np.mean(k == 0) >= 0.49 and np.unique(k).size <= 8 for k in kernels)
    assert all(type(l).__module__.startswith("tf_keras.") for l in plain.layers)


@pytest.mark.parametrize("plan", ["PQAT", "PCQAT"])
def test_tfmot_strip_of_a_qat_model_holds_the_int8_files_kernels(digits, tmp_path, plan):
    """A tfmot quantization-aware model, stripped: stock tf_keras layers of the user's
    architecture whose kernels are the int8 file's, dequantized (each the file's int8 value
    times one scale per output channel), zeros and shared values kept."""
    from conftest import tiny_sequential

    (x, y), (xt, _) = digits
    phases = [colopt.Prune(0.5, epochs=1)] + (
        [colopt.Cluster(8, epochs=1)] if plan == "PCQAT" else []) + [colopt.Quantize(epochs=1)]
    qat = colopt.collaborative_fit(tiny_sequential(), x, y, batch_size=64, verbose=0,
                                   phases=phases, rate_policy="compiled").model
    plain = colopt.strip(qat)
    assert all(type(l).__module__.startswith("tf_keras.") for l in plain.layers)
    mine = tiny_sequential()
    mine.set_weights(plain.get_weights())  # the user's own architecture takes them
    agree = np.mean(mine.predict(xt, verbose=0).argmax(1) == qat.predict(xt, verbose=0).argmax(1))
    assert agree >= 0.95  # the activations' ranges are gone: the same argmax almost everywhere
    path = colopt.export.to_tflite(qat, tmp_path / "qat.tflite", quantization="int8").path
    stored = colopt.export.read_weights(path)
    for layer in ("conv", "hidden", "logits"):
        kernel = mine.get_layer(layer).get_weights()[0]
        (q,) = [w for name, w in stored.items() if f"quant_{layer}/" in name]
        q = np.moveaxis(q, 0, -1) if q.ndim == 4 else q.T  # (O,H,W,I) / (O,I) -> Keras order
        assert q.shape == kernel.shape
        np.testing.assert_array_equal(kernel == 0, q == 0)
        scale = np.where(q != 0, kernel / np.where(q != 0, q, 1), np.nan)
        for channel in range(kernel.shape[-1]):  # one scale per output channel
            s = scale[..., channel][~np.isnan(scale[..., channel])]
            assert s.size == 0 or np.allclose(s, s[0], rtol=1e-5), (layer, channel)
        if plan == "PCQAT":
            assert stats.unique_values(kernel, axis=-1).max() <= 8, layer


def _prune_cluster_weights_hold(model, names):
    """Each named layer's own rank >= 2 weights (not our mask or centroids): half zeros
    and at most 8 values per output channel, the values its effective kernel holds."""
    for layer in model.layers:
        if layer.name not in names:
            continue
        kernel = layer.get_weights()[0]
        assert np.mean(kernel == 0) >= 0.49, layer.name
        assert stats.unique_values(kernel, axis=-1).max() <= 8, layer.name


@pytest.mark.parametrize("entry", ["collaborative_fit", "drop-in"])
def test_keras3_run_ends_with_the_compressed_values_in_the_raw_kernels(digits, entry):
    """Without strip: at the end of a run the layers' own kernel variables hold what they
    compute with (as a tfmot-wrapped layer's do), and what the model computes is unchanged
    by it."""
    import keras

    (x, y), (xt, _) = digits
    phases = [colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)]
    if entry == "collaborative_fit":
        model = colopt.collaborative_fit(_k3_model(), x, y, phases=phases, batch_size=64,
                                         verbose=0, rate_policy="compiled").model
    else:
        model = _k3_model()
        model.fit(x, y, epochs=2, batch_size=64, verbose=0,
                  callbacks=[colopt.callbacks.CollaborativeOptimization(phases)])
    _prune_cluster_weights_hold(model, {"conv", "hidden", "logits"})
    kernel = model.get_layer("hidden").get_weights()[0]
    np.testing.assert_array_equal(kernel, np.asarray(model.get_layer("hidden").kernel))
    before = model.predict(xt, verbose=0)
    model.get_layer("hidden").kernel  # noqa: B018 (re-associates: must not move anything)
    np.testing.assert_allclose(model.predict(xt, verbose=0), before, rtol=1e-6, atol=1e-6)
    assert isinstance(model.get_layer("hidden"), keras.layers.Dense)


def test_tfmot_run_ends_with_the_compressed_values_in_the_raw_kernels(digits):
    from conftest import tiny_sequential

    (x, y), _ = digits
    pruned = colopt.collaborative_fit(tiny_sequential(), x, y, batch_size=64, verbose=0,
                                      phases=[colopt.Prune(0.5, epochs=1)],
                                      rate_policy="compiled").model
    for layer in pruned.layers:
        if layer.name.endswith(("hidden", "logits")):  # the wrapper's own kernel variable
            kernel = layer.layer.kernel.numpy()
            assert np.mean(kernel == 0) >= 0.49, layer.name
    clustered = colopt.collaborative_fit(tiny_sequential(), x, y, batch_size=64, verbose=0,
                                         phases=[colopt.Cluster(8, epochs=1)],
                                         rate_policy="compiled").model
    for layer in clustered.layers:
        if layer.name.endswith(("hidden", "logits")):
            for name, original in layer.original_clusterable_weights.items():
                assert len(np.unique(original.numpy())) <= 8, (layer.name, name)


def test_tfmot_strip_of_a_functional_qat_model_with_batch_norm(digits):
    """tfmot rewrites a conv before a BatchNormalization (its activation becomes tfmot's
    NoOpActivation): stripped, it is a plain linear conv again; the input quantizer becomes
    an Identity layer; the user's architecture takes the weights."""
    import tf_keras as keras

    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="img")
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="c")(inputs)
    h = keras.layers.ReLU(name="r")(keras.layers.BatchNormalization(name="bn")(h))
    outputs = keras.layers.Dense(10, name="out")(keras.layers.Flatten(name="f")(h))
    model = compile_(keras.Model(inputs, outputs, name="fn"))
    qat = colopt.collaborative_fit(model, x, y, batch_size=64, verbose=0, rate_policy="compiled",
                                   phases=[colopt.Prune(0.5, epochs=1),
                                           colopt.Quantize(epochs=1)]).model
    plain = colopt.strip(qat)
    assert [type(l).__name__ for l in plain.layers] == [
        "InputLayer", "Identity", "Conv2D", "BatchNormalization", "ReLU", "Flatten", "Dense"]
    assert plain.get_layer("c").get_config()["activation"] == "linear"
    mine = keras.models.clone_model(model)
    mine.set_weights(plain.get_weights())
    agree = np.mean(mine.predict(xt, verbose=0).argmax(1) == qat.predict(xt, verbose=0).argmax(1))
    assert agree >= 0.95
    assert np.mean(mine.get_layer("out").get_weights()[0] == 0) >= 0.49
