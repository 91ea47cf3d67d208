"""Nothing lost without a word: every layer holding kernels (weights of rank >= 2: an
attention's projections, an RNN's cell, a Dense inside a custom layer) is either compressed
by each phase that selects it, or named before training in `result.skipped` and the log,
in both engines and in the drop-in callback."""

import logging

import numpy as np
import pytest


def _data(n=128):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 10, 8)).astype("float32"), rng.integers(0, 4, n)


def _model(keras, wrapped_cls):
    keras.utils.set_random_seed(0)
    i = keras.Input((10, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(i, i)
    h = wrapped_cls(name="wrapped")(h)
    h = keras.layers.LSTM(16, name="lstm")(h)
    o = keras.layers.Dense(4, name="out")(h)
    m = keras.Model(i, o)
    m.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def _wrapped(keras):
    class Wrapped(keras.layers.Layer):
        """A custom layer holding a Dense."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.inner = keras.layers.Dense(8)

        def call(self, x):
            return self.inner(x)
    return Wrapped


def _holding_kernels(model):
    return {l.name for l in model.layers if any(len(w.shape) >= 2 for w in l.trainable_weights)}


def _check(result, caplog, engine_kernels):
    """Each layer holding kernels: compressed (>= 49 % zeros, <= 8 values in every kernel it
    holds) or named in skipped for both phases, and in a warning line."""
    named = set(result.skipped["Prune"])
    assert named == set(result.skipped["Cluster (sparsity-preserving)"])
    compressed = set()
    for layer in result.model.layers:
        for _, k, _ in engine_kernels(layer):
            assert np.mean(k == 0) >= 0.49 and np.unique(k).size <= 8, layer.name
            compressed.add(layer.name.replace("cluster_", ""))
    assert compressed | named >= {"mha", "wrapped", "lstm", "out"}, (compressed, named)
    for name in named:
        assert any("cannot touch" in r.getMessage() and name in r.getMessage()
                   for r in caplog.records), name
    return compressed, named


def test_keras3_names_every_layer_holding_kernels_it_cannot_compress(caplog):
    import keras
    import keras_colopt as colopt
    from keras_colopt.engines.keras3 import compress

    x, y = _data()
    with caplog.at_level(logging.WARNING, logger="keras_colopt"):
        result = colopt.collaborative_fit(
            _model(keras, _wrapped(keras)), x, y, batch_size=32, verbose=0,
            phases=[colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)])

    def kernels(layer):  # a MultiHeadAttention's: its four projections'; an LSTM's: its two
        return [("kernel", compress.effective_numpy(s), -1)
                for _, s in compress.sublayers(layer) or [(layer.name, layer)]
                if compress.is_compressed(s)]
    compressed, named = _check(result, caplog, kernels)
    assert compressed == {"out", "mha", "lstm"} and named == {"wrapped"}
    assert len(kernels(result.model.get_layer("mha"))) == 4
    assert len(kernels(result.model.get_layer("lstm"))) == 2


def test_keras3_drop_in_names_them_too(caplog):
    import keras
    import keras_colopt as colopt

    x, y = _data()
    model = _model(keras, _wrapped(keras))
    cb = colopt.callbacks.CollaborativeOptimization(
        [colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)])
    with caplog.at_level(logging.WARNING, logger="keras_colopt"):
        model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert set(cb.skipped["Prune"]) == {"wrapped"}
    assert any("cannot touch 1 layer(s)" in r.getMessage() for r in caplog.records)
    from keras_colopt.engines.keras3 import compress  # the LSTM's two kernels, through fit
    parts = [s for _, s in compress.sublayers(model.get_layer("lstm"))]
    assert len(parts) == 2 and all(np.mean(compress.effective_numpy(s) == 0) >= 0.49
                                   for s in parts)


def test_tfmot_compresses_an_lstm_through_its_registries_and_names_the_rest(caplog):
    """tfmot prunes and clusters RNN cells (and clusters attention): the engine selects
    through its registries instead of a top-level `kernel`; naming the LSTM in `layers=` is
    no longer a KeyError."""
    import tf_keras as keras
    import keras_colopt as colopt
    from keras_colopt.engines.tfmot import read

    x, y = _data()
    with caplog.at_level(logging.WARNING, logger="keras_colopt"):
        result = colopt.collaborative_fit(
            _model(keras, _wrapped(keras)), x, y, batch_size=32, verbose=0,
            custom_objects={"Wrapped": _wrapped(keras)},
            phases=[colopt.Prune(0.5, epochs=1), colopt.Cluster(8, epochs=1)])
    compressed, named = _check(result, caplog, read.kernels)
    assert {"lstm", "out"} <= compressed and "wrapped" in named
    named_lstm = colopt.collaborative_fit(
        _model(keras, _wrapped(keras)), x, y, batch_size=32, verbose=0,
        custom_objects={"Wrapped": _wrapped(keras)},
        phases=[colopt.Prune(0.5, epochs=1, layers=["lstm"])])
    (lstm,) = [l for l in named_lstm.model.layers if "lstm" in l.name]
    assert all(np.mean(k == 0) >= 0.49 for _, k, _ in read.kernels(lstm))
    model = _model(keras, _wrapped(keras))
    wrapped = [l.name for l in model.layers if type(l).__name__ == "Wrapped"]
    with pytest.raises(ValueError, match="cannot prune the layer"):
        colopt.collaborative_fit(model, x, y, batch_size=32, verbose=0,
                                 custom_objects={"Wrapped": _wrapped(keras)},
                                 phases=[colopt.Prune(0.5, epochs=1, layers=wrapped)])


def test_keras3_names_an_einsum_dense_whose_output_channels_it_cannot_say(caplog):
    """An EinsumDense is compressed when its equation sums some kernel axes and outputs the
    rest (a FULLY_CONNECTED filter); with a kernel axis in both input and output (a batched
    product: no such filter) it is named, and refused when named in `layers=`."""
    import keras
    import keras_colopt as colopt

    def model():
        keras.utils.set_random_seed(0)
        i = keras.Input((10, 8))
        h = keras.layers.EinsumDense("abc,bcd->abd", (10, 6), name="batched")(i)
        h = keras.layers.EinsumDense("abc,cd->abd", (10, 6), name="projection")(h)
        o = keras.layers.Dense(4, name="out")(keras.layers.Flatten()(h))
        m = keras.Model(i, o)
        m.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    x, y = _data()
    with caplog.at_level(logging.WARNING, logger="keras_colopt"):
        result = colopt.collaborative_fit(model(), x, y, batch_size=32, verbose=0,
                                          phases=[colopt.Prune(0.5, epochs=1)])
    assert result.skipped["Prune"] == ["batched"]
    assert any("cannot touch" in r.getMessage() and "batched" in r.getMessage()
               for r in caplog.records)
    stats = colopt.callbacks.layer_stats(result.model)
    assert stats["projection"].sparsity >= 0.49 and stats["out"].sparsity >= 0.49
    with pytest.raises(ValueError, match="batched"):
        colopt.collaborative_fit(model(), x, y, batch_size=32, verbose=0,
                                 phases=[colopt.Prune(0.5, epochs=1, layers=["batched"])])
