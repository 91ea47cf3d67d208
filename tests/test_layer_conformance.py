"""Layer conformance of the Keras 3 engine: one row per layer class it compresses (one
`compress.Adapter` each). Every row must keep, on a tiny model holding that layer:

- the pruning mask at every training step (not only at epoch ends);
- its clusters, per tensor and per output channel, with the pruned zeros kept;
- both through a `.keras` save and load;
- and in the int8 `.tflite`, in the operator its adapter names: the zeros, and at most the
  clusters' count of values per output channel.

Adding a layer class to the engine is one `Adapter` plus its row here.
"""

import keras
import numpy as np
import pytest

import keras_colopt as colopt
from keras_colopt.engines.keras3 import compress

SPARSITY, CLUSTERS, TOL = 0.5, 4, 0.01
L = keras.layers


def _head(h):
    return L.Dense(10, name="logits")(L.Flatten()(h))


# (id, the layer class, a model holding one such layer named "it" from its input, the
# input's shape: the 8x8x1 digits unless named; (64,) are the digits' pixels as tokens 0-16).
ROWS = [
    ("Dense", L.Dense,
     lambda i: _head(L.Dense(16, activation="relu", name="it")(L.Flatten()(i))), None),
    ("Conv1D", L.Conv1D,
     lambda i: _head(L.Conv1D(8, 3, activation="relu", name="it")(L.Reshape((8, 8))(i))), None),
    ("Conv2D", L.Conv2D, lambda i: _head(L.Conv2D(8, 3, activation="relu", name="it")(i)), None),
    ("DepthwiseConv2D", L.DepthwiseConv2D, lambda i: _head(L.DepthwiseConv2D(
        3, depth_multiplier=2, activation="relu", name="it")(L.Conv2D(4, 1, name="pw")(i))),
     None),
    ("Conv2DTranspose", L.Conv2DTranspose, lambda i: _head(L.Conv2DTranspose(
        6, 3, strides=2, padding="same", activation="relu", name="it")(
            L.Conv2D(4, 3, strides=2, name="down")(i))), None),
    ("Conv1DTranspose", L.Conv1DTranspose, lambda i: _head(L.Conv1DTranspose(
        6, 3, strides=2, padding="same", activation="relu", name="it")(L.Reshape((8, 8))(i))),
     None),
    ("Conv3D", L.Conv3D, lambda i: _head(L.Conv3D(6, 3, activation="relu", name="it")(
        L.Reshape((4, 4, 4, 1))(i))), None),
    # Five taps: a channel of three would hold fewer weights than the clusters.
    ("DepthwiseConv1D", L.DepthwiseConv1D, lambda i: _head(L.DepthwiseConv1D(
        5, depth_multiplier=2, activation="relu", name="it")(L.Reshape((8, 8))(i))), None),
    ("Embedding", L.Embedding, lambda i: _head(L.Embedding(17, 8, name="it")(i)), (64,)),
    # MultiHeadAttention's query projection: kernel (c, d, e), output channels d*e.
    ("EinsumDense", L.EinsumDense, lambda i: _head(L.EinsumDense(
        "abc,cde->abde", (8, 2, 4), bias_axes="de", activation="relu", name="it")(
            L.Reshape((8, 8))(i))), None),
    # Its output projection: kernel (d, e, c) summed over d and e.
    ("EinsumDense_output", L.EinsumDense, lambda i: _head(L.EinsumDense(
        "abde,dec->abc", (8, 6), bias_axes="c", name="it")(L.Reshape((8, 2, 4))(i))), None),
    # The summed axis last in the kernel: the adapter's axis order puts it first.
    ("EinsumDense_transposed", L.EinsumDense, lambda i: _head(L.EinsumDense(
        "abc,dc->abd", (8, 6), name="it")(L.Reshape((8, 8))(i))), None),
]


def test_every_layer_class_the_engine_compresses_has_a_row():
    assert {cls for _, cls, _, _ in ROWS} == set(compress.ADAPTERS)


def _model(build, shape):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape or (8, 8, 1), dtype="int32" if shape else "float32")
    model = keras.Model(inputs, build(inputs))
    model.compile(keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class MaskAtEveryStep(keras.callbacks.Callback):
    """The least sparsity of the named layers, as they compute, after every training batch of
    a Prune phase (a constant schedule: the target holds from the first step)."""

    def __init__(self, names=("it",)):
        super().__init__()
        self.names, self.seen = names, []

    def on_train_batch_end(self, batch, logs=None):
        if colopt.engines.get_engine(self.model, compiled=False).wrapper_kind(
                self.model) == "prune":
            stats = colopt.callbacks.layer_stats(self.model)
            self.seen.append(min(stats[n].sparsity for n in self.names))


# Dense, EinsumDense and Embedding are clustered per tensor whatever the phase asks (their
# adapters' `per_channel`): Dense's per-channel case checks that, the others would repeat it.
_PER_TENSOR_ONLY = {"Embedding", "EinsumDense", "EinsumDense_output", "EinsumDense_transposed"}
CASES = [pytest.param(row, per_channel,
                      id=f"{row[0]}-{'per_channel' if per_channel else 'per_tensor'}")
         for row in ROWS for per_channel in (False, True)
         if not (per_channel and row[0] in _PER_TENSOR_ONLY)]


@pytest.mark.parametrize("row, per_channel", CASES)
def test_layer_keeps_its_compression_in_keras_on_disk_and_in_the_tflite(digits, tmp_path,
                                                                          row, per_channel):
    (x, y), _ = digits
    _, cls, build, shape = row
    x, y = x[:256], y[:256]
    if shape:  # the pixels (0-16, scaled to [0, 1]) as tokens
        x = np.rint(x.reshape(len(x), -1) * 16).astype("int32")
    model = _model(build, shape)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    adapter = compress.adapter(model.get_layer("it"))
    steps = MaskAtEveryStep()
    r = colopt.collaborative_fit(  # (the invariants are checked here: no rate probe)
        model, x, y, batch_size=64, verbose=0, callbacks=[steps], rate_policy="compiled",
        phases=[
            colopt.Prune(SPARSITY, epochs=1, schedule="constant", layers=["it"]),
            colopt.Cluster(CLUSTERS, epochs=1, per_channel=per_channel, layers=["it"])])
    # The mask, after every step of the Prune phase.
    assert len(steps.seen) == 4 and min(steps.seen) >= SPARSITY - TOL, steps.seen
    # The clusters (zero is one of them), per output channel where the adapter clusters so.
    st = colopt.callbacks.layer_stats(r.model)["it"]
    assert st.sparsity >= SPARSITY - TOL
    by_channel = per_channel and adapter.per_channel
    assert (st.unique_per_channel_max if by_channel else st.unique) <= CLUSTERS
    if by_channel:
        assert st.unique > CLUSTERS  # per channel, not per tensor
    # Saved and loaded: the same kernel as it computes.
    path = tmp_path / "m.keras"
    r.model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(colopt.callbacks.effective_kernels(again)["it"][0][1],
                                  colopt.callbacks.effective_kernels(r.model)["it"][0][1])
    # In the int8 file: the adapter's operator holds the zeros and the clusters per channel.
    tflite = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                     representative_data=x[:64]).path
    (w,) = [w for w in colopt.export.inspect_tflite(tflite)
            if colopt.export.layer_of(w.name, ["it", "logits", "pw", "down"]) == "it"]
    assert w.op == adapter.tflite_op and w.dtype == adapter.tflite_dtype
    if w.dtype == "int8" and w.op != "GATHER":  # LiteRT quantizes a GATHER's table per tensor
        assert w.per_channel_quantized  # counted per output channel, the file's own axis
    assert w.sparsity >= SPARSITY - TOL and w.unique_per_channel_max <= CLUSTERS


def _attention(i):
    h = L.Reshape((8, 8))(i)
    return _head(L.MultiHeadAttention(2, 4, name="it")(h, h))


# Containers (`compress.CONTAINERS`), whose kernels are sublayers' named by path: (id, class,
# model, {sublayer path: the operator holding its kernel in the int8 file}, per channel).
CONTAINER_ROWS = [
    ("MultiHeadAttention", L.MultiHeadAttention, _attention,
     {f"it/{p}": "FULLY_CONNECTED" for p in ("query", "key", "value", "attention_output")},
     False),
    # Its depthwise and pointwise kernels: LiteRT's DEPTHWISE_CONV_2D and 1x1 CONV_2D.
    ("SeparableConv2D", L.SeparableConv2D, lambda i: _head(L.SeparableConv2D(
        8, 3, depth_multiplier=2, activation="relu", name="it")(L.Conv2D(4, 1, name="pw")(i))),
     {"it/depthwise": "DEPTHWISE_CONV_2D", "it/pointwise": "CONV_2D"}, True),
    ("SeparableConv1D", L.SeparableConv1D, lambda i: _head(L.SeparableConv1D(
        8, 5, depth_multiplier=2, activation="relu", name="it")(L.Reshape((8, 8))(i))),
     {"it/depthwise": "DEPTHWISE_CONV_2D", "it/pointwise": "CONV_2D"}, True),
    # A recurrent cell's input and recurrent kernels: a FULLY_CONNECTED each per timestep of
    # the int8 file (exported unrolled), whose constants the converter names after no layer.
    *[(rnn.__name__, rnn, lambda i, rnn=rnn: _head(rnn(8, name="it")(L.Reshape((8, 8))(i))),
       {"it/kernel": "FULLY_CONNECTED", "it/recurrent_kernel": "FULLY_CONNECTED"}, False)
      for rnn in (L.LSTM, L.GRU, L.SimpleRNN)],
    # Both directions' kernels, named by their recurrent layer (same shapes, told apart in the
    # file by their signs: `export.layers_of`).
    ("Bidirectional", L.Bidirectional, lambda i: _head(L.Bidirectional(
        L.LSTM(8, name="rnn"), name="it")(L.Reshape((8, 8))(i))),
     {f"it/{d}_rnn/{k}": "FULLY_CONNECTED" for d in ("forward", "backward")
      for k in ("kernel", "recurrent_kernel")}, False),
]


def test_every_container_class_has_a_row():
    assert {cls for _, cls, _, _, _ in CONTAINER_ROWS} == set(compress.CONTAINERS)


@pytest.mark.parametrize("row", CONTAINER_ROWS, ids=[r[0] for r in CONTAINER_ROWS])
def test_container_kernels_keep_their_compression_on_disk_and_in_the_tflite(digits, tmp_path,
                                                                            row):
    """A container's kernels (MultiHeadAttention's four EinsumDense projections, a
    SeparableConv2D's depthwise and pointwise kernels, a recurrent layer's input and recurrent
    kernels) are compressed in place, named by path ('it/query', 'it/depthwise'); the
    container's class carries their state, so a `.keras` round trip and a copy keep it, and
    `colopt.strip` gives back the stock class computing with the same kernels; the int8 file
    holds it in each kernel's operator."""
    (x, y), _ = digits
    x, y = x[:256], y[:256]
    _, cls, build, ops, per_channel = row
    model = _model(build, None)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    names = list(ops)
    steps = MaskAtEveryStep(names)
    r = colopt.collaborative_fit(  # (the invariants are checked here: no rate probe)
        model, x, y, batch_size=64, verbose=0, callbacks=[steps], rate_policy="compiled",
        phases=[
            colopt.Prune(SPARSITY, epochs=1, schedule="constant"),
            colopt.Cluster(CLUSTERS, epochs=1, per_channel=per_channel)])
    assert len(steps.seen) == 4 and min(steps.seen) >= SPARSITY - TOL, steps.seen
    assert not any(n.startswith("it") for skip in r.skipped.values() for n in skip), r.skipped
    stats = colopt.callbacks.layer_stats(r.model)
    for name in names:
        st = stats[name]
        assert st.sparsity >= SPARSITY - TOL, name
        assert (st.unique_per_channel_max if per_channel else st.unique) <= CLUSTERS, name
    path = tmp_path / "m.keras"
    r.model.save(path)
    again = keras.models.load_model(path)
    before, after = (colopt.callbacks.effective_kernels(m) for m in (r.model, again))
    for name in names:
        np.testing.assert_array_equal(after[name][0][1], before[name][0][1])
    # The stock model (a copy with the compression baked in) holds the same kernels.
    plain = colopt.strip(r.model)
    assert type(plain.get_layer("it")) is cls
    if cls in compress.RECURRENT:
        assert type(plain.get_layer("it").cell) is type(model.get_layer("it").cell)
    if cls is L.Bidirectional:
        for rnn in (plain.get_layer("it").forward_layer, plain.get_layer("it").backward_layer):
            assert type(rnn) is L.LSTM and type(rnn.cell) is L.LSTMCell
    stock = colopt.callbacks.effective_kernels(plain)
    for name in names:
        np.testing.assert_array_equal(stock[name][0][1], before[name][0][1])
    tflite = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                     representative_data=x[:64]).path
    held = {}
    weights = colopt.export.inspect_tflite(tflite)
    for w, layer in zip(weights, colopt.export.layers_of(tflite, before)):
        if layer in names:
            held[layer] = w
    assert set(held) == set(names), [w.name for w in colopt.export.inspect_tflite(tflite)]
    for name, w in held.items():
        assert w.op == ops[name] and w.dtype == "int8", name
        assert w.sparsity >= SPARSITY - TOL and w.unique_per_channel_max <= CLUSTERS, name
