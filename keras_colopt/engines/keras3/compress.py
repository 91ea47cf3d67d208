"""Pruning and weight clustering of Keras 3 layers, in place, written with `keras.ops`.

A supported layer (one with an `Adapter` in `ADAPTERS`: that class, or a subclass of it whose
call reads the kernel through that property, checked by `reads_kernel_property`) is made
compressible by swapping its class for a subclass whose kernel property returns the kernel
the layer computes with, the *effective* kernel, instead of the raw variable:

    prune:    raw * mask                       (mask recomputed in-graph on the schedule)
    cluster:  centroids[nearest(raw)] (* mask)  (raw trains through a straight-through
              gradient, the centroids through the gather; indices re-associated each call)
    quantize: int8 fake-quant of the above      (symmetric per output channel, scale
              max|w|/127, as the converter quantizes a constant kernel; straight-through)

Quantization-aware layers also fake-quantize their output (and their input where it is a
model input) per tensor over a moving range, as LiteRT will (`quantize.plan_ranges` says
which tensors: not the ones the converter fuses into the next op).

The mask, the centroids and the pruning step are variables of the layer itself, so they
train, save (`save_own_variables`, which the stock method would drop) and checkpoint with
it; no wrapper layer changes the model's graph, its layer names or its output names.
`bake` writes the effective kernel back into the raw variable and restores the stock class.

Every kernel is read through one 2-D view `(-1, channels)` whose channels are the output
channels of the converted `.tflite` kernel, in its order: the last axis for Dense and Conv
(`(kh, kw, in, out)`), `in * multiplier` for a DepthwiseConv2D (`(kh, kw, C, M)`), the
second to last for a Conv2DTranspose (`(kh, kw, out, in)`), the axes of the output for an
EinsumDense (from its equation), the features of an Embedding's table. Each layer class's
`Adapter` says how (see `ADAPTERS`): supporting a new class is one row there, plus its rows in the
layer conformance table (`tests/test_layer_conformance.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from typing import Callable, Optional, Tuple

import numpy as np

from keras_colopt import kmeans
from keras_colopt.engines.keras3 import compat
from keras_colopt.engines.keras3._deps import keras, ops
from keras_colopt.phases import polynomial_sparsity


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How the engine reads, compresses and exports one Keras layer class's kernel.

    Attributes:
        kernel: the attribute the layer's `call` reads its kernel from (the engine's subclass
            turns it into a property returning the effective kernel).
        raw: the variable behind `kernel` when the stock class already makes `kernel` a
            property (Dense, Conv: `_kernel`, see `compat.raw_kernel_attribute`); None when
            `kernel` is the variable itself, kept in the instance dict.
        perm: the axis order that puts the output channels last (None: they are last).
        channel_axes: how many trailing axes (after `perm`) make one output channel: 2 for a
            DepthwiseConv2D, whose `(C, M)` become the converted file's `C * M` channels.
        input_axis: the axis of the input channels (2:4 pruning groups weights along it).
        per_channel: whether a per-channel Cluster phase clusters it per output channel (a
            Dense kernel is clustered per tensor, as in tfmot).
        quantize: whether the Quantize phase (QAT) knows how LiteRT quantizes it.
        tflite_op: the `.tflite` operator the converter stores the kernel in (the layer
            conformance test looks for the compression there; `export` finds weights by
            operator on its own, engine-neutral).
        tflite_dtype: how an int8 file stores it: "float32" where LiteRT keeps the operator
            in float (CONV_3D), so the zeros and clusters survive in float values.
        table: a lookup table (an Embedding's, a GATHER's input): LiteRT quantizes it per
            tensor and asymmetrically, like an activation, and the lookup's output keeps the
            table's scale; QAT fake-quantizes it so and gives its output no range of its own.
        specialize: for a class whose axes depend on the layer's configuration (an
            EinsumDense's equation), `layer -> Adapter` for that layer, or None where the
            engine cannot say which axes are the output channels (the layer is then named as
            one it cannot touch).
        bias_apart: LiteRT adds the bias in an ADD of its own, after the FULLY_CONNECTED and a
            RESHAPE, whatever the layer's input (an EinsumDense whose bias spans several
            output axes: MultiHeadAttention's query, key and value projections).
        product: `(layer, x) -> x times the kernel, without the bias`, for a class whose bias
            LiteRT may add apart (`bias_apart`; a Dense on a sequence, `quantize.plan_ranges`
            says): QAT ranges the tensor before the bias too.
    """

    kernel: str
    raw: Optional[str]
    perm: Optional[Tuple[int, ...]] = None
    channel_axes: int = 1
    input_axis: int = -2
    per_channel: bool = True
    quantize: bool = True
    tflite_op: str = "CONV_2D"
    tflite_dtype: str = "int8"
    specialize: Optional[Callable] = None
    table: bool = False
    bias_apart: bool = False
    product: Optional[Callable] = None

    def channels(self, shape) -> int:
        shape = [int(d) for d in shape]
        if self.perm is not None:
            shape = [shape[a] for a in self.perm]
        return int(np.prod(shape[len(shape) - self.channel_axes:]))

    def view(self, w):
        """`w` as `(values, output channels)` (a tensor, or an array for an array)."""
        xp = np if isinstance(w, np.ndarray) else ops
        channels = self.channels(w.shape)
        if self.perm is not None:
            w = xp.transpose(w, self.perm)
        return xp.reshape(w, (-1, channels))

    def unview(self, v, shape):
        """The kernel of `shape` that `view` made `v` from."""
        xp = np if isinstance(v, np.ndarray) else ops
        if self.perm is None:
            return xp.reshape(v, shape)
        permuted = [shape[a] for a in self.perm]
        return xp.transpose(xp.reshape(v, permuted), [self.perm.index(a)
                                                       for a in range(len(self.perm))])

    def readable(self, w: np.ndarray):
        """`(array, channel axis)` as the statistics count it: the output channels on one
        axis, in the converted file's order."""
        if self.channel_axes > 1:
            if self.perm is not None:
                return self.view(w), -1
            return w.reshape(w.shape[:-self.channel_axes] + (-1,)), -1
        if self.perm is not None:
            return w, self.perm[-1] - len(self.perm)
        return w, -1


def _einsum_adapter(layer) -> Optional[Adapter]:
    """An EinsumDense's axes from its equation (e.g. MultiHeadAttention's query projection
    "abc,cde->abde": kernel (c, d, e), output channels d*e). LiteRT converts such a layer to a
    FULLY_CONNECTED whose filter is the kernel as `(output channels, inputs)`: the kernel
    axes summed over (in the input, not the output) come first, the axes of the output last.
    None for an equation where a kernel axis is in both (a batched product) or in neither,
    or with an ellipsis: no FULLY_CONNECTED filter, and no output channels to say."""
    equation = str(layer.equation).replace(" ", "")
    try:
        inputs, rest = equation.split(",")
        kernel, output = rest.split("->")
    except ValueError:
        return None
    if "." in equation:
        return None
    summed = [a for a, c in enumerate(kernel) if c in inputs and c not in output]
    produced = [a for a, c in enumerate(kernel) if c in output and c not in inputs]
    if not summed or not produced or len(summed) + len(produced) != len(kernel):
        return None
    perm = tuple(summed + produced)
    # The FULLY_CONNECTED takes the bias where there is one output axis and the bias is on
    # it (or there is no bias). Otherwise LiteRT adds the bias after a RESHAPE, in an ADD
    # whose input gets a range of its own (MultiHeadAttention's query/key/value projections).
    bias_axes = str(getattr(layer, "bias_axes", None) or "")
    fused_bias = getattr(layer, "bias", None) is None or (
        len(produced) == 1 and bias_axes == kernel[produced[0]])
    return Adapter("kernel", _RAW, perm=None if perm == tuple(range(len(kernel))) else perm,
                   channel_axes=len(produced), per_channel=False, bias_apart=not fused_bias,
                   product=_einsum_product,
                   # 2:4 groups along the innermost input axis of the flattened filter
                   input_axis=max(summed, key=lambda a: inputs.index(kernel[a])),
                   tflite_op="FULLY_CONNECTED")


def _einsum_product(layer, x):
    return ops.einsum(layer.equation, x, layer.kernel)


def _dense_product(layer, x):
    return ops.matmul(x, layer.kernel)


_RAW = compat.raw_kernel_attribute()
# One row per layer class the engine compresses (and its subclasses that read the kernel
# through the same property: `reads_kernel_property`).
ADAPTERS = {
    # On a sequence (rank > 2) LiteRT adds a Dense's bias after the FULLY_CONNECTED and a
    # RESHAPE, in an ADD of its own.
    keras.layers.Dense: Adapter("kernel", _RAW, per_channel=False, input_axis=0,
                                tflite_op="FULLY_CONNECTED", product=_dense_product),
    keras.layers.Conv1D: Adapter("kernel", _RAW),
    keras.layers.Conv2D: Adapter("kernel", _RAW),
    keras.layers.DepthwiseConv2D: Adapter("kernel", None, channel_axes=2,
                                          tflite_op="DEPTHWISE_CONV_2D"),
    # (k, in, multiplier): LiteRT runs it as a DEPTHWISE_CONV_2D of one row.
    keras.layers.DepthwiseConv1D: Adapter("kernel", None, channel_axes=2,
                                          tflite_op="DEPTHWISE_CONV_2D"),
    # (kh, kw, out, in): the output channels are the second to last axis; LiteRT's
    # TRANSPOSE_CONV stores (out, kh, kw, in), quantized per output channel, with its bias.
    keras.layers.Conv2DTranspose: Adapter("kernel", None, perm=(0, 1, 3, 2), input_axis=-1,
                                          tflite_op="TRANSPOSE_CONV"),
    # (k, out, in); the converter expands it to a TRANSPOSE_CONV of (out, 1, k, in).
    keras.layers.Conv1DTranspose: Adapter("kernel", None, perm=(0, 2, 1), input_axis=-1,
                                          tflite_op="TRANSPOSE_CONV"),
    # LiteRT 2.21 keeps CONV_3D in float32 in an int8 file (no int8 kernel for it).
    keras.layers.Conv3D: Adapter("kernel", _RAW, quantize=False, tflite_op="CONV_3D",
                                 tflite_dtype="float32"),
    # (input_dim, output_dim): a GATHER's table; an output channel is one embedding feature.
    keras.layers.Embedding: Adapter("embeddings", compat.raw_embeddings_attribute(),
                                    input_axis=-1, per_channel=False, tflite_op="GATHER",
                                    table=True),
    keras.layers.EinsumDense: Adapter("kernel", _RAW, tflite_op="FULLY_CONNECTED",
                                      specialize=_einsum_adapter),
}
SUPPORTED = tuple(ADAPTERS)
QUANTIZABLE = tuple(c for c, a in ADAPTERS.items() if a.quantize)
_COMPRESSED = {}  # stock class -> its compressible subclass


@dataclasses.dataclass
class PruneSpec:
    sparsity: float
    initial_sparsity: float = 0.0
    schedule: str = "polynomial"  # or "constant"
    end_step: int = 1             # polynomial: the step the target is reached at
    frequency: int = 1
    m_by_n: Optional[Tuple[int, int]] = None


@dataclasses.dataclass
class ClusterSpec:
    clusters: int
    per_channel: bool = False
    preserve_sparsity: bool = False


@dataclasses.dataclass
class QuantizeSpec:
    weights: bool = True       # fake-quantize the kernel (False: the converter will)
    per_channel: bool = True   # one scale per output channel (else one per tensor)
    inputs: bool = False       # fake-quantize the input (it is a model input)
    outputs: bool = True       # fake-quantize the output (not fused into the next op)
    bias_apart: bool = False   # LiteRT adds the bias in an ADD of its own (`Adapter.product`)


@dataclasses.dataclass
class Spec:
    """What one compressible layer does now (a plain object: not tracked by Keras)."""

    prune: Optional[PruneSpec] = None
    cluster: Optional[ClusterSpec] = None
    quantize: Optional[QuantizeSpec] = None


_COMPRESSION = ("_colopt_mask", "_colopt_step", "_colopt_centroids")
# input, output, before the activation (or the bias: `Adapter.bias_apart`), and the rows of
# the tensors inside a layer's computation (`InnerRanges`)
_RANGES = ("_colopt_in", "_colopt_out", "_colopt_pre", "_colopt_inner")
_STATE = _COMPRESSION + _RANGES
# Activations LiteRT fuses into the op before them; any other (softmax, sigmoid, ...) runs as
# an op of its own, whose input needs a range too.
FUSED_ACTIVATIONS = ("linear", "relu", "relu6")
_OBSERVED = {}  # stock class -> its range-observing subclass (`quantize`)
_CARRYING = {}  # stock container class -> its subclass that carries its sublayers' state

# Layers that build supported layers of their own, outside the model's graph, by attribute
# (MultiHeadAttention's EinsumDense projections): the engine compresses those in place, and
# the container's config carries their compression, so that a copy or a loaded model builds
# them with the same variables (its own build makes stock ones).
def _separable_parts(layer) -> list:
    """A SeparableConv2D's (SeparableConv1D's) depthwise and pointwise kernels as a
    DepthwiseConv2D and a 1x1 Conv2D (their 1-D forms) that hold its own two variables
    (LiteRT runs it as exactly those two operators)."""
    one_d = _stock(type(layer)) is keras.layers.SeparableConv1D
    depthwise, conv = ((keras.layers.DepthwiseConv1D, keras.layers.Conv1D) if one_d
                       else (keras.layers.DepthwiseConv2D, keras.layers.Conv2D))
    dw = depthwise(layer.kernel_size, use_bias=False, name="depthwise",
                   depth_multiplier=layer.depth_multiplier)
    pw = conv(layer.filters, 1, use_bias=False, name="pointwise")
    object.__setattr__(dw, "kernel", layer.__dict__["depthwise_kernel"])
    object.__setattr__(pw, _RAW, layer.__dict__["pointwise_kernel"])
    return [dw, pw]


def _recurrent_parts(cell) -> list:
    """A recurrent cell's (LSTM's, GRU's, SimpleRNN's) input and recurrent kernels,
    `(inputs, gates * units)` and `(units, gates * units)`, as two Dense layers holding its
    own two variables: a FULLY_CONNECTED each, per timestep, in LiteRT (the gates' units are
    the output channels)."""
    parts = []
    for attr in ("kernel", "recurrent_kernel"):
        var = cell.__dict__[attr]
        part = keras.layers.Dense(int(var.shape[-1]), use_bias=False, name=attr)
        object.__setattr__(part, _RAW, var)
        parts.append(part)
    return parts


SEPARABLE = (keras.layers.SeparableConv2D, keras.layers.SeparableConv1D)
_PART_MAKERS = {**{sep: _separable_parts for sep in SEPARABLE},
                **{cell: _recurrent_parts for cell in (keras.layers.LSTMCell,
                                                       keras.layers.GRUCell,
                                                       keras.layers.SimpleRNNCell)}}


def _kernel_parts(layer) -> list:
    """A layer's kernels as layers of the classes whose operators LiteRT runs them as
    (`_PART_MAKERS`), made once per layer: each kernel is then compressed by its own class's
    adapter, and the variables of their compression are the layer's (`_owner`), which saves
    and trains them."""
    parts = _PARTS.get(layer)
    if parts is None:
        parts = _PART_MAKERS[_stock(type(layer))](layer)
        for part in parts:
            _OWNERS[part] = weakref.ref(layer)
            part.built = True
        _PARTS[layer] = parts
    return parts


# Kept off the layers' attributes: Keras' saving walks every attribute, and an owner's parts
# that pointed back at it would make a cycle that loading never leaves.
_PARTS = weakref.WeakKeyDictionary()  # layer -> its kernel parts
_OWNERS = weakref.WeakKeyDictionary()  # kernel part -> (a weak reference to) its layer


def _owner(layer):
    """The layer whose variables hold a layer's compression state: itself, or for a kernel part
    (`_kernel_parts`), the layer the kernel is of."""
    ref = _OWNERS.get(layer)
    return layer if ref is None else ref()


# Recurrent layers: their cell computes with the kernels, once per timestep.
RECURRENT = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)


def _bidirectional_parts(layer) -> list:
    """A Bidirectional's two recurrent layers' kernels, named by the layer they are of
    ('forward_lstm/kernel'): each recurrent layer carries its own (`carry`)."""
    return [(f"{rnn.name}/{name}", part) for rnn in (layer.forward_layer, layer.backward_layer)
            if _stock(type(rnn)) in RECURRENT for name, part in sublayers(rnn)]


# Layers whose compressible kernels are other layers': `layer -> [sublayer, or (name,
# sublayer)]`. The sublayers are compressed in place and named by path ('mha/query',
# 'sep/depthwise', 'lstm/kernel', 'bi/forward_lstm/kernel').
CONTAINERS = {keras.layers.MultiHeadAttention: compat.attention_projections,
              **{sep: _kernel_parts for sep in SEPARABLE},
              **{rnn: lambda layer: _kernel_parts(layer.cell) for rnn in RECURRENT},
              keras.layers.Bidirectional: _bidirectional_parts}
# Containers of containers, whose class carries nothing: their sublayers' own containers do.
WRAPPERS = (keras.layers.Bidirectional,)
# Layers whose own attributes are their parts' kernels (the attribute -> the part's index):
# a container itself, or a recurrent layer's cell (`kernel_holder`).
_RECURRENT_KERNELS = {"kernel": 0, "recurrent_kernel": 1}
KERNEL_PARTS = {**{sep: {"depthwise_kernel": 0, "pointwise_kernel": 1} for sep in SEPARABLE},
                **{cell: _RECURRENT_KERNELS for cell in _PART_MAKERS if cell not in SEPARABLE}}


def kernel_holder(container):
    """The layer whose attributes are a container's kernels: a recurrent layer's cell, or the
    container itself."""
    return container.cell if _stock(type(container)) in RECURRENT else container


def adapter(layer) -> Optional[Adapter]:
    """The layer's adapter (None: its class has one, but not for this configuration)."""
    a = ADAPTERS[base_class(type(layer))]
    return a.specialize(layer) if a.specialize is not None else a


def base_class(cls):
    """The supported class (a key of `ADAPTERS`) that a layer class is or subclasses (a
    user's, or KerasHub's, subclass of Dense: Dense); for any other, the class as the user
    built it."""
    stock = _stock(cls)
    return next((c for c in stock.__mro__ if c in ADAPTERS), stock)


_READS = {}  # a user's subclass of a supported class -> whether its call reads the property


def reads_kernel_property(layer) -> bool:
    """Whether the layer computes with the kernel its class's adapter names (`kernel`, a
    property the compressible subclass overrides), so that compressing it changes what it
    computes. True for a supported class itself; a subclass (whose `call` may read the raw
    variable, or a kernel of its own) is checked once, by calling it eagerly on zeros of its
    input's shape with that property watched. A subclass that could not be checked (no single
    input) counts as not reading it: it is named, not compressed."""
    cls = _stock(type(layer))
    if cls in ADAPTERS:
        return True
    if cls not in _READS:
        _READS[cls] = _watched_call_reads(layer, cls)
    return _READS[cls]


def _below_base(cls) -> tuple:
    """The classes of `cls`'s MRO before the supported class it subclasses (none for that
    class itself): where a user's subclass may redefine what the supported class does."""
    base = base_class(cls)
    return cls.__mro__[:cls.__mro__.index(base)] if base in cls.__mro__ else ()


def own_call(layer) -> bool:
    """Whether the layer's class is a subclass of a supported class with a call of its own
    (what it computes around the kernel is not the supported class's)."""
    return any("call" in vars(c) for c in _below_base(_stock(type(layer))))


def _watched_call_reads(layer, cls) -> bool:
    base = base_class(cls)
    a = ADAPTERS[base]
    if any(a.kernel in vars(c) or (a.raw and a.raw in vars(c)) for c in _below_base(cls)):
        return False  # it defines the kernel (or its variable) itself
    try:
        spec = layer.input
        x = np.zeros((1,) + tuple(d or 1 for d in spec.shape[1:]), spec.dtype)
    except (AttributeError, ValueError, TypeError):
        return False
    seen = []
    # A property of the class (Dense's kernel), or the variable in the instance's dict
    # (DepthwiseConv2D's), which the probe's property then shadows.
    stock_property = inspect.getattr_static(base, a.kernel, None)

    def watched(self):
        seen.append(True)
        return stock_property.fget(self) if isinstance(stock_property, property) \
            else self.__dict__[a.kernel]
    probe = type(cls.__name__, (cls,), {a.kernel: property(watched)})
    was = type(layer)
    object.__setattr__(layer, "__class__", probe)
    try:
        layer.call(x)
    except Exception:  # noqa: BLE001 (any failure: not shown to read it)
        return False
    finally:
        object.__setattr__(layer, "__class__", was)
    return bool(seen)


def quantizable(layer) -> bool:
    """Whether the Quantize phase knows how LiteRT quantizes this layer's kernel (its class's
    adapter, specialised to the layer where it depends on its configuration)."""
    return supports(layer) and adapter(layer).quantize


def supported_names(quantize: bool = False) -> str:
    """The supported classes' names, for messages: "Dense, Conv1D, ... or Conv2DTranspose"."""
    names = [c.__name__ for c in (QUANTIZABLE if quantize else SUPPORTED)]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _stock(cls):
    for family in (_COMPRESSED, _OBSERVED, _CARRYING):
        for stock, sub in family.items():
            if sub is cls:
                return stock
    return cls


def supports(layer) -> bool:
    """A supported class, or a subclass of one whose call reads the kernel through the
    property the engine overrides (`reads_kernel_property`), built, and configured so that
    the engine can say which axes are its output channels."""
    return (base_class(type(layer)) in ADAPTERS and layer.built and adapter(layer) is not None
            and reads_kernel_property(layer))


def is_compressed(layer) -> bool:
    return type(layer) in _COMPRESSED.values()


def raw_kernel(layer):
    a = adapter(layer)
    return getattr(layer, a.raw) if a.raw else layer.__dict__[a.kernel]


def view_channels(layer) -> int:
    return adapter(layer).channels(raw_kernel(layer).shape)


def view(layer, w):
    """`w` (a kernel of `layer`) as `(values, output channels)`: see `Adapter.view`."""
    return adapter(layer).view(w)


# --------------------------------------------------------------------------- the math

def effective(layer, raw):
    """The kernel `layer` computes with, from its raw kernel (a tensor; graph-safe)."""
    spec = getattr(layer, "_colopt_spec", None)
    if spec is None:
        return raw
    w = raw
    if spec.cluster is not None:
        w = _clustered(layer, raw, spec.cluster)
    mask = getattr(layer, "_colopt_mask", None)
    if mask is not None:
        w = w * ops.cast(mask, w.dtype)
    if spec.quantize is not None and spec.quantize.weights:
        w = fake_quant_weights(layer, w, spec.quantize.per_channel)
    return w


def fake_quant_weights(layer, w, per_channel: bool):
    """`w` on the symmetric int8 grid the converter will put it on: scale max|w|/127 per
    output channel (the last axis of the 2-D view) or per tensor; zeros stay exactly zero
    and N distinct values stay at most N. The gradient passes straight through. A lookup
    table (`Adapter.table`) on its per-tensor asymmetric grid over [min, max] instead.

    (Keras' fake-quant over [-m, m], narrow range, computes the same values as one fused
    TensorFlow op, but the converter then refuses the plain-fit model, whose graph still
    holds it: a per-channel quantized reshape. Measured on the demo CNN: a PCQAT epoch 4 %
    shorter, not worth it.)"""
    if adapter(layer).table:  # per tensor, asymmetric: the converter's grid for a GATHER's
        lo = ops.stop_gradient(ops.minimum(ops.min(w), 0.0))  # table (0 stays exact)
        hi = ops.stop_gradient(ops.maximum(ops.max(w), 0.0))
        return keras.quantizers.fake_quant_with_min_max_vars(w, lo, hi, num_bits=8)
    shape = ops.shape(w)
    v = view(layer, w) if per_channel else ops.reshape(w, (-1,))
    m = ops.max(ops.abs(v), axis=0)
    scale = ops.where(m > 0, m / 127.0, ops.ones_like(m))
    q = ops.clip(ops.round(v / scale), -127.0, 127.0) * scale
    out = v + ops.stop_gradient(q - v)
    return adapter(layer).unview(out, shape) if per_channel else ops.reshape(out, shape)


RANGE_DECAY = 0.999  # tfmot's MovingAverageQuantizer
INITIAL_RANGE = (-6.0, 6.0, 0.0)  # (min, max, seen): tfmot's initial range until a batch


def fake_quant_range(x, var, training: bool):
    """`x` fake-quantized per tensor (8 bits, asymmetric) over the range in `var`, which
    training moves: the first batch's range, then an exponential moving average of the
    batches' (min <= 0 <= max, as LiteRT requires). TensorFlow lowers it to the
    FakeQuantWithMinMaxVars op, whose range the converter takes for the int8 tensor."""
    r = ops.convert_to_tensor(var)
    if training:
        r = _moved(r, x)
        var.assign(r)
    return keras.quantizers.fake_quant_with_min_max_vars(x, r[0], r[1], num_bits=8)


def _moved(r, x):
    """The range `r` (min, max, seen) moved by the batch `x`. (min, max, seen) move as one
    vector: half the small ops of moving min and max apart, which a PCQAT step of a small
    model pays per ranged tensor."""
    seen_x = ops.stop_gradient(x)
    lo = ops.minimum(ops.min(seen_x), 0.0)
    batch = ops.stack([lo, ops.maximum(ops.max(seen_x), 0.0), ops.ones_like(lo)])
    return ops.where(r[2] > 0, r * RANGE_DECAY + batch * (1 - RANGE_DECAY), batch)


class InnerRanges:
    """Fake quantization of the tensors inside one layer's computation (a LayerNormalization's
    mean, variance, ...; an attention's scores), each over its own moving range: row i of the
    layer's `_colopt_inner` variable for the i-th tensor it is called on. The rows are written
    back in one assignment (`commit`), after the last."""

    def __init__(self, layer, training: bool):
        self.var, self.training = layer._colopt_inner, training
        self.rows, self.moved = ops.convert_to_tensor(self.var), []

    def __call__(self, x, observed=None):
        """`x` fake-quantized over the next row's range, which training moves by `x` (or by
        `observed`, the float value that `x` approximates)."""
        r = self.rows[len(self.moved)]
        if self.training:
            r = _moved(r, x if observed is None else observed)
        self.moved.append(r)
        return keras.quantizers.fake_quant_with_min_max_vars(x, r[0], r[1], num_bits=8)

    def commit(self) -> None:
        assert len(self.moved) == int(self.var.shape[0]), (len(self.moved), self.var.shape)
        if self.training:
            self.var.assign(ops.stack(self.moved))


def fake_quant_softmax(x):
    """A softmax output on the grid LiteRT's int8 SOFTMAX writes: scale 1/256, zero point
    -128, i.e. [0, 255/256] (fixed: the converter does not take a range for it)."""
    return keras.quantizers.fake_quant_with_min_max_vars(x, 0.0, 255.0 / 256.0, num_bits=8)


def is_training(layer) -> bool:
    ctx = compat.call_context(layer)
    return bool(ctx is not None and ctx.training)


def ranged_call(layer, inputs, compute, training: bool):
    """`compute(inputs)` with the layer's input and output fake-quantized where it has their
    ranges (`add_ranges`)."""
    if layer._colopt_in is not None:
        at = layer.__dict__.get("_colopt_in_at")
        if at is None:
            inputs = fake_quant_range(inputs, layer._colopt_in, training)
        else:  # one of its inputs, which a keras.ops operation computes
            inputs = list(inputs)
            inputs[at] = fake_quant_range(inputs[at], layer._colopt_in, training)
    out = compute(inputs)
    if layer._colopt_out is not None:
        out = fake_quant_range(out, layer._colopt_out, training)
    return out


def activation_name(layer) -> str:
    """The name of the activation a layer applies itself ("linear" without one)."""
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def _clustered(layer, raw, spec: ClusterSpec):
    shape = ops.shape(raw)
    centroids = layer._colopt_centroids
    if spec.per_channel:  # centroids (channels, k)
        v = view(layer, raw)
        dist = ops.abs(ops.expand_dims(v, -1) - ops.expand_dims(centroids, 0))
        idx = ops.argmin(dist, axis=-1)
        onehot = ops.one_hot(idx, spec.clusters, dtype=v.dtype)
        clustered = adapter(layer).unview(
            ops.sum(onehot * ops.expand_dims(centroids, 0), axis=-1), shape)
    else:  # centroids (k,): the nearest by bisection between the sorted centroids' midpoints,
        # twice as fast as a (weights x k) distance matrix (same values, same gradients)
        ordered = ops.sort(centroids)
        mids = (ordered[1:] + ordered[:-1]) / 2
        idx = ops.searchsorted(mids, ops.reshape(raw, (-1,)))
        clustered = ops.reshape(ops.take(ordered, idx), shape)
    # Straight-through: the raw kernel trains as if it were the clustered one (tfmot's
    # ClusterWeights does the same), so the association can move as training goes.
    return clustered + (raw - ops.stop_gradient(raw))  # exactly `clustered` in value


def target_sparsity(spec: PruneSpec, step):
    """The sparsity at pruning step `step` (a tensor): tfmot's PolynomialDecay (cubic) or
    the constant target."""
    if spec.schedule == "constant" or spec.m_by_n is not None:
        return ops.convert_to_tensor(spec.sparsity, "float32")
    progress = ops.minimum(ops.cast(step, "float32") / float(max(1, spec.end_step)), 1.0)
    return polynomial_sparsity(spec.initial_sparsity, spec.sparsity, progress)


def magnitude_mask(w, sparsity):
    """1 where |w| is among the largest (1 - sparsity) of the tensor, else 0 (ties kept)."""
    flat = ops.reshape(ops.abs(w), (-1,))
    n = int(np.prod(w.shape))
    drop = ops.cast(ops.floor(ops.cast(sparsity, "float32") * n + 1e-6), "int32")
    drop = ops.minimum(drop, n - 1)
    ordered = ops.sort(flat)
    # Keep everything strictly above the largest dropped magnitude.
    threshold = ops.take(ordered, ops.maximum(drop - 1, 0))
    above = ops.cast(ops.abs(w) > threshold, w.dtype)
    return ops.where(drop > 0, above, ops.ones_like(w))


def m_by_n_mask(w, m: int, n: int, input_axis: int = -2):
    """Keeps the `m` largest of every `n` consecutive weights along the input axis."""
    rank = len(w.shape)
    axis = input_axis % rank
    perm = [a for a in range(rank) if a != axis] + [axis]  # input axis last
    t = ops.transpose(ops.abs(w), perm)
    tshape = ops.shape(t)
    groups = ops.reshape(t, (-1, n))
    order = ops.argsort(-groups, axis=-1)
    ranks = ops.argsort(order, axis=-1)
    keep = ops.cast(ranks < m, w.dtype)
    return ops.transpose(ops.reshape(keep, tshape), [perm.index(a) for a in range(rank)])


def _update_mask(layer, spec: PruneSpec):
    """One training step of pruning. Steps count from 1 (the step being taken): the mask is
    computed on the first step and on every `frequency`-th; a polynomial ramp stops at
    `end_step`, where the target is reached (an update step by construction)."""
    step = layer._colopt_step
    mask = layer._colopt_mask
    raw = ops.convert_to_tensor(raw_kernel(layer))  # a value: jax.numpy takes no Variable
    t = ops.convert_to_tensor(step) + 1
    due = ops.logical_or(ops.equal(t, 1), ops.equal(t % spec.frequency, 0))
    if spec.schedule != "constant" and spec.m_by_n is None:
        due = ops.logical_and(due, t <= spec.end_step)

    def new_mask():
        if spec.m_by_n is not None:
            return m_by_n_mask(raw, *spec.m_by_n, input_axis=adapter(layer).input_axis)
        return magnitude_mask(raw, target_sparsity(spec, t))
    mask.assign(ops.cond(due, new_mask, lambda: ops.convert_to_tensor(mask)))
    step.assign(t)


# --------------------------------------------------------------------------- the class swap

def _compressible_class(stock):
    """The compressible subclass of `stock`: a supported class, or a user's subclass of one
    (then saved under one name for all, `SUBCLASS`, with the user's class in its config)."""
    if stock in _COMPRESSED:
        return _COMPRESSED[stock]
    prop, raw_attr = ADAPTERS[base_class(stock)].kernel, ADAPTERS[base_class(stock)].raw
    own = stock in ADAPTERS

    def getter(self):
        raw = getattr(self, raw_attr, None) if raw_attr else self.__dict__.get(prop)
        return None if raw is None else effective(self, raw)  # None: not built yet

    def setter(self, value):
        self.__dict__[prop] = value

    def call(self, inputs, *args, **kwargs):
        spec = self._colopt_spec
        training = is_training(self)
        if spec.prune is not None and training:
            _update_mask(self, spec.prune)
        apart = spec.quantize is not None and spec.quantize.bias_apart
        if self._colopt_pre is None and not apart:
            return ranged_call(self, inputs, lambda i: stock.call(self, i, *args, **kwargs),
                               training)

        def compute(i):
            act = self.activation
            if apart:  # FULLY_CONNECTED, RESHAPE, then the bias's own ADD: ranged before it
                q = InnerRanges(self, training)
                out = q(adapter(self).product(self, i)) + self.bias
                q.commit()
            else:
                object.__setattr__(self, "activation", keras.activations.linear)
                try:
                    out = stock.call(self, i, *args, **kwargs)
                finally:
                    object.__setattr__(self, "activation", act)
            if self._colopt_pre is not None:  # an activation LiteRT runs on its own
                out = fake_quant_range(out, self._colopt_pre, training)
            return act(out)
        return ranged_call(self, inputs, compute, training)

    def get_config(self):
        config = stock.get_config(self)
        config["colopt"] = _compression_config(self)
        if not own:
            config["colopt_class"] = {
                "registered_name": keras.saving.get_registered_name(stock),
                "module": stock.__module__, "qualname": stock.__qualname__}
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        saved = config.pop("colopt", None) or {}
        config.pop("colopt_class", None)
        layer = stock.from_config(config)
        object.__setattr__(layer, "__class__", cls)
        _init_state(layer)
        object.__setattr__(layer, "_colopt_pending", saved)
        after_build(layer, _materialize)
        return layer

    ns = {prop: property(getter, None if raw_attr else setter), "call": call,
          "save_own_variables": save_all_variables, "load_own_variables": load_all_variables,
          "get_config": get_config, "from_config": from_config,
          "__module__": __name__, "__doc__": f"A compressible {stock.__name__} (keras_colopt)."}
    sub = type(stock.__name__, (stock,), ns)
    sub.__qualname__ = f"compressible.{stock.__name__}"
    keras.saving.register_keras_serializable(
        package="keras_colopt", name=stock.__name__ if own else SUBCLASS)(sub)
    if not own:  # the name resolves to the class that finds the user's (`_Subclass`)
        keras.saving.get_custom_objects()["keras_colopt>" + SUBCLASS] = _Subclass
    _COMPRESSED[stock] = sub
    return sub


SUBCLASS = "CompressibleSubclass"


class _Subclass:
    """What `keras_colopt>CompressibleSubclass` resolves to when a model is loaded: the
    compressible subclass of the user's class its config names (found by its registered
    name, else imported from its module), made in this process if it was not yet."""

    @classmethod
    def from_config(cls, config):
        ref = config["colopt_class"]
        user = keras.saving.get_registered_object(ref["registered_name"])
        if user is None:
            import importlib
            try:
                user = importlib.import_module(ref["module"])
                for part in ref["qualname"].split("."):
                    user = getattr(user, part)
            except (ImportError, AttributeError):
                raise TypeError(
                    f"Cannot load a compressed {ref['qualname']}: its class is neither "
                    f"registered as {ref['registered_name']!r} nor importable from module "
                    f"{ref['module']!r}. Import (or register) the module that defines it "
                    "before loading the model.") from None
        return _compressible_class(user).from_config(config)


keras.saving.get_custom_objects()["keras_colopt>" + SUBCLASS] = _Subclass


def _compression_config(layer) -> dict:
    """What a compressible layer's config records of its compression (`_materialize` makes
    the variables again from it)."""
    spec = layer._colopt_spec
    return {
        "prune": None if spec.prune is None else dataclasses.asdict(spec.prune),
        "cluster": None if spec.cluster is None else dataclasses.asdict(spec.cluster),
        "quantize": None if spec.quantize is None else dataclasses.asdict(spec.quantize),
        "masked": layer._colopt_mask is not None}


def sublayers(layer) -> list:
    """`[(name, sublayer)]` of a built container (`CONTAINERS`); [] for any other layer."""
    inside = CONTAINERS.get(_stock(type(layer)))
    if inside is None or not layer.built:
        return []
    return [s if isinstance(s, tuple) else (s.name, s) for s in inside(layer) if s is not None]


def is_container(layer) -> bool:
    return _stock(type(layer)) in CONTAINERS


def carry(container) -> None:
    """Gives a container the class that carries its compressed sublayers' state in its config
    while any of them is compressed (with its own ranges, the quantization-aware class of
    `quantize.observe`), and its stock class back when none is."""
    stock = _stock(type(container))
    if stock not in CONTAINERS:
        return
    if stock in WRAPPERS:  # a Bidirectional: its two recurrent layers carry their own
        for rnn in (container.forward_layer, container.backward_layer):
            carry(rnn)
        return
    held = any(is_compressed(s) for _, s in sublayers(container))
    ranged = getattr(container, "_colopt_inner", None) is not None  # (`quantize.observe`)
    object.__setattr__(container, "__class__", _OBSERVED[stock] if ranged
                       else _carrying_class(stock) if held else stock)
    _carry_cell(container, held)


def _carry_cell(container, held: bool) -> None:
    """A recurrent layer's cell reads its kernels from its parts while any is compressed
    (`KERNEL_PARTS`), and as its stock class does otherwise."""
    holder = kernel_holder(container)
    if holder is not container:
        cell = _stock(type(holder))
        object.__setattr__(holder, "__class__", _carrying_class(cell) if held else cell)


def _carrying_class(stock):
    if stock in _CARRYING:
        return _CARRYING[stock]

    def get_config(self):
        config = stock.get_config(self)
        config["colopt_sublayers"] = {name: _compression_config(sub)
                                      for name, sub in sublayers(self) if is_compressed(sub)}
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        saved = config.pop("colopt_sublayers", None) or {}
        layer = stock.from_config(config)
        object.__setattr__(layer, "__class__", cls)

        def materialize_sublayers(container):
            inside = dict(sublayers(container))
            for name, state in saved.items():
                sub = inside[name]
                _swap(sub)
                object.__setattr__(sub, "_colopt_pending", state)
                _materialize(sub)
            _carry_cell(container, bool(saved))
        after_build(layer, materialize_sublayers)
        return layer

    ns = {"get_config": get_config, "from_config": from_config, "__module__": __name__,
          "__doc__": f"A {stock.__name__} whose sublayers are compressed (keras_colopt)."}
    if stock in KERNEL_PARTS:  # its kernels are its parts' (effective) kernels
        ns.update({attr: property(functools.partial(_part_kernel, attr=attr, index=i),
                                          _own_kernel(attr))
                   for attr, i in KERNEL_PARTS[stock].items()})
    if stock in KERNEL_PARTS and stock in CONTAINERS:
        def call(self, *args, **kwargs):
            prune_parts(self)
            return stock.call(self, *args, **kwargs)
        ns["call"] = call
    elif stock in RECURRENT:
        def call(self, *args, **kwargs):
            # One pruning step per call, not per timestep, and the effective kernels computed
            # once for all timesteps (the cell reads them at every one).
            prune_parts(self)
            cell = self.cell
            cell.__dict__["_colopt_now"] = {attr: getattr(cell, attr)
                                            for attr in _RECURRENT_KERNELS}
            try:
                return stock.call(self, *args, **kwargs)
            finally:
                cell.__dict__.pop("_colopt_now", None)
        ns["call"] = call
    sub = type(stock.__name__, (stock,), ns)
    sub.__qualname__ = f"carrying.{stock.__name__}"
    keras.saving.register_keras_serializable(package="keras_colopt", name=stock.__name__)(sub)
    _CARRYING[stock] = sub
    return sub


def prune_parts(layer) -> None:
    """One training step of pruning for each kernel part of `layer` (the parts are not called
    themselves: the layer computes with their kernels)."""
    if is_training(layer):
        for part in _kernel_parts(kernel_holder(layer)):
            spec = getattr(part, "_colopt_spec", None)
            if spec is not None and spec.prune is not None:
                _update_mask(part, spec.prune)


def _part_kernel(self, attr, index):
    if not self.built:  # being built (or loaded): the variable itself, or None before it
        return self.__dict__.get(attr)
    now = self.__dict__.get("_colopt_now")  # computed once for this call (a recurrent cell)
    return now[attr] if now is not None else _kernel_parts(self)[index].kernel


def _own_kernel(attr):
    def setter(self, value):  # (the stock build assigns the variable)
        self.__dict__[attr] = value
    return setter


def after_build(layer, then) -> None:
    """Runs `then(layer)` right after the layer's stock build: the compression variables of a
    loaded or cloned layer are made then, before load_own_variables or set_weights fills them.
    (Keras sets `build` on each instance, its build wrapper, so a class attribute would not
    run.)"""
    stock_build = layer.build

    @functools.wraps(stock_build)  # Keras reads build's signature to call it
    def build(*args, **kwargs):
        stock_build(*args, **kwargs)
        then(layer)
    object.__setattr__(layer, "build", build)


def save_all_variables(layer, store) -> None:
    """`save_own_variables` for every variable of the layer: the stock Dense/Conv method saves
    kernel and bias only, so masks, centroids and ranges would be lost."""
    for i, v in enumerate(layer.variables):
        store[str(i)] = v.numpy()


def load_all_variables(layer, store) -> None:
    for i, v in enumerate(layer.variables):
        v.assign(store[str(i)])


def _materialize(layer) -> None:
    """Creates the compression variables a saved config describes (values to be loaded)."""
    saved = layer._colopt_pending
    if not saved:
        return
    if saved.get("prune"):
        p = dict(saved["prune"])
        p["m_by_n"] = tuple(p["m_by_n"]) if p.get("m_by_n") else None
        make_prunable(layer, PruneSpec(**p))
    elif saved.get("masked"):
        make_masked(layer)
    if saved.get("cluster"):
        c = ClusterSpec(**saved["cluster"])
        layer._colopt_spec.cluster = c
        k = (view_channels(layer), c.clusters) if c.per_channel else (c.clusters,)
        _set(layer, "_colopt_centroids",
             _add(layer, "colopt_centroids", np.zeros(k), trainable=True))
    if saved.get("quantize"):
        make_quantized(layer, QuantizeSpec(**saved["quantize"]))
    object.__setattr__(layer, "_colopt_pending", None)


@contextlib.contextmanager
def unlocked(obj):
    """Lets a built layer or model take new state (Keras locks its tracker after build)."""
    locked = compat.tracker(obj).locked
    compat.tracker(obj).unlock()
    try:
        yield
    finally:
        if locked:
            compat.tracker(obj).lock()


def _set(layer, attr, var) -> None:
    """Sets a variable attribute the way `self.x = self.add_weight(...)` does, so that TF
    checkpoints (`tf.train.Checkpoint`, which follows attributes) save and restore it."""
    with unlocked(layer):
        setattr(layer, attr, var)


def _add(layer, name, value, dtype="float32", trainable=False, aggregation="none"):
    """A variable of the layer's, set to `value`. `aggregation` says how replicas of a
    tf.distribute strategy combine their writes in a training step: each replica assigns its
    own copy, and with "none" the copies drift apart silently."""
    owner = _owner(layer)
    with unlocked(owner):
        var = owner.add_weight(name=name if owner is layer else f"{layer.name}_{name}",
                               shape=tuple(np.shape(value)), dtype=dtype,
                               initializer="zeros", trainable=trainable,
                               aggregation=aggregation)
    var.assign(np.asarray(value, dtype=dtype))
    return var


def _drop(layer, attr):
    var = getattr(layer, attr, None)
    if var is not None:
        compat.untrack_variable(_owner(layer), var)
        _set(layer, attr, None)


def make_prunable(layer, spec: PruneSpec) -> None:
    _swap(layer)
    layer._colopt_spec.prune = spec
    # Every replica computes the same mask from the same (mirrored) kernel: the first's is kept.
    ones = np.ones(tuple(raw_kernel(layer).shape))
    _set(layer, "_colopt_mask", _add(layer, "colopt_mask", ones, aggregation="only_first_replica"))
    _set(layer, "_colopt_step",
         _add(layer, "colopt_step", 0, "int32", aggregation="only_first_replica"))


def make_masked(layer) -> None:
    """A fixed mask of the kernel's zeros: they stay zero while the other weights train."""
    _swap(layer)
    raw = np.asarray(raw_kernel(layer).numpy())
    _set(layer, "_colopt_mask", _add(layer, "colopt_mask", (raw != 0).astype(np.float32)))


def make_clusterable(layer, spec: ClusterSpec, centroids) -> None:
    """`centroids`: (k,) or (channels, k), from `init_centroids`."""
    _swap(layer)
    layer._colopt_spec.cluster = spec
    if spec.preserve_sparsity:
        make_masked(layer)
    _set(layer, "_colopt_centroids", _add(layer, "colopt_centroids", centroids, trainable=True))


def separate_activation(layer) -> bool:
    """Whether LiteRT will run the layer's activation as an op of its own (e.g. softmax)."""
    return activation_name(layer) not in FUSED_ACTIVATIONS


def add_ranges(layer, inputs, outputs: bool, before_activation: bool = False,
               inner: int = 0) -> None:
    """The moving (min, max) ranges of the layer's fake-quantized input and output (and of
    its output before an activation LiteRT does not fuse, and of `inner` tensors inside its
    computation: `InnerRanges`). `inputs`: True for its input (all of it), or the position
    of the one input that gets a range (an int)."""
    object.__setattr__(layer, "_colopt_in_at",
                       None if isinstance(inputs, bool) else int(inputs))
    inputs = inputs is not False
    for attr, wanted in zip(_RANGES, (inputs, outputs, before_activation)):
        if wanted:
            # Each replica sees its own batch: their moving ranges are averaged.
            _set(layer, attr, _add(layer, attr[1:] + "_range", INITIAL_RANGE,
                                   aggregation="mean"))
    if inner:
        _set(layer, "_colopt_inner", _add(layer, "colopt_inner_ranges",
                                          [INITIAL_RANGE] * inner, aggregation="mean"))


def make_quantized(layer, spec: QuantizeSpec) -> None:
    """Quantization-aware training of the layer (on top of its mask and centroids, if any)."""
    _swap(layer)
    layer._colopt_spec.quantize = spec
    add_ranges(layer, spec.inputs, spec.outputs, separate_activation(layer),
               inner=int(spec.bias_apart))


def _init_state(layer) -> None:
    object.__setattr__(layer, "_colopt_spec", Spec())
    object.__setattr__(layer, "_colopt_pending", None)
    for attr in _STATE:
        _set(layer, attr, None)


def _swap(layer) -> None:
    if not is_compressed(layer):
        object.__setattr__(layer, "__class__", _compressible_class(type(layer)))
        _init_state(layer)


def bake(layer) -> None:
    """Writes the effective kernel into the raw variable, drops the compression variables
    and gives the layer its stock class back (a BatchNormalization its batch statistics)."""
    unfreeze_statistics(layer)
    if not is_compressed(layer):
        return
    raw_kernel(layer).assign(effective_numpy(layer))
    for attr in _STATE:
        _drop(layer, attr)
    object.__setattr__(layer, "_colopt_spec", None)
    object.__setattr__(layer, "__class__", _stock(type(layer)))


def settle(layer) -> None:
    """Writes the pruned and clustered kernel (zeros and shared values; for a quantization-
    aware layer before its int8 fake-quant, which stays in the layer) into the raw variable,
    keeping the layer's class and state: `get_weights()` then shows what the layer computes
    with, as a tfmot-wrapped layer's does, and nothing the layer computes changes (a masked
    weight is already zero, a clustered one already its centroid, and both map to the same
    values again: `effective(settled) == effective(raw)`)."""
    spec = getattr(layer, "_colopt_spec", None)
    if not is_compressed(layer) or spec is None or (
            spec.cluster is None and getattr(layer, "_colopt_mask", None) is None):
        return
    quantize, spec.quantize = spec.quantize, None
    try:
        w = effective_numpy(layer)
    finally:
        spec.quantize = quantize
    raw_kernel(layer).assign(w)


def to_stock(layer) -> None:
    """The layer as the user built it, computing what it computed: its effective kernel (for
    a quantization-aware layer, on the int8 grid: the values the .tflite holds, dequantized)
    written into the raw variable, every variable of ours (mask, step, centroids, ranges)
    dropped, the stock class back: `bake`, and the same for a layer that only observes its
    activations' ranges (QAT), which `bake` leaves."""
    bake(layer)
    if type(layer) in _OBSERVED.values():
        for attr in _RANGES:
            _drop(layer, attr)
        object.__setattr__(layer, "__class__", _stock(type(layer)))


def bake_for_export(layer) -> None:
    """A quantization-aware layer with its effective kernel (already on the int8 grid) written
    into the raw variable, without its mask and centroids: the converter folds the kernel into
    one constant (the nearest-centroid search would not fold) and quantizes it to the same
    ints; the ranges and the weight fake-quant (which leaves grid values as they are) stay."""
    if not is_compressed(layer) or layer._colopt_spec.quantize is None:
        return
    raw_kernel(layer).assign(effective_numpy(layer))
    for attr in _COMPRESSION:
        _drop(layer, attr)
    layer._colopt_spec.prune = layer._colopt_spec.cluster = None


# --------------------------------------------------------------------------- batch norm

@keras.saving.register_keras_serializable(package="keras_colopt", name="BatchNormalization")
class MovingStatsBatchNormalization(keras.layers.BatchNormalization):
    """A BatchNormalization that normalizes with its moving statistics in training too (gamma
    and beta still train). During a Cluster phase, as tfmot's `cluster_weights(model)` does
    (its wrapper calls every layer without `training`): the phase trains what the model
    computes at inference. Left on batch statistics, that its moving ones (momentum 0.999 in
    MobileNetV2) do not follow, a clustered MobileNetV2 was right in training mode and wrong
    at inference (benchmarks/results/mobilenetv2_cluster_phase.md)."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


def freeze_statistics(layer) -> None:
    if type(layer) is keras.layers.BatchNormalization:
        object.__setattr__(layer, "__class__", MovingStatsBatchNormalization)


def unfreeze_statistics(layer) -> None:
    if type(layer) is MovingStatsBatchNormalization:
        object.__setattr__(layer, "__class__", keras.layers.BatchNormalization)


def effective_numpy(layer) -> np.ndarray:
    """The effective kernel as an array, for the callbacks that read it every epoch. On
    TensorFlow it is computed by a graph traced once per layer and compression state (the
    spec and the variables it reads): op by op, eagerly, a PCQAT kernel's ~60 small ops took
    17 ms a layer, so CompressionMetrics and InvariantGuard added 80 ms to a 250 ms demo-CNN
    epoch (traced: 18 ms)."""
    if keras.backend.backend() != "tensorflow":
        return np.asarray(ops.convert_to_numpy(effective(layer, raw_kernel(layer))))
    key = (repr(getattr(layer, "_colopt_spec", None)),
           *(id(getattr(layer, a, None)) for a in _COMPRESSION), id(raw_kernel(layer)))
    cached = layer.__dict__.get("_colopt_effective_fn")
    if cached is None or cached[0] != key:
        from keras_colopt.engines.keras3._deps import tf

        fn = tf.function(lambda: effective(layer, raw_kernel(layer)),
                         autograph=False)  # no tensor-dependent Python flow to convert
        # Each of these functions is traced once; TensorFlow counts the traces of all of
        # them together (one lambda's code) and would warn of "retracing" to the user.
        compat.omit_frequent_tracing_warning(fn)
        cached = (key, fn)
        object.__setattr__(layer, "_colopt_effective_fn", cached)
    return np.asarray(cached[1]())


# --------------------------------------------------------------------------- centroids

def init_centroids(values: np.ndarray, k: int, method: str, rng: np.random.Generator):
    """`k` initial centroids of a 1-D array, sorted, by the Cluster phase's `init`:

    - "kmeans++" (the default): the optimal 1-D k-means centroids, `kmeans.kmeans_1d` (the
      least within-cluster sum of squares; what k-means++ seeding and Lloyd iterations
      approximate). Fewer distinct values than `k`: those values, the largest repeated.
    - "linear": equally spaced between the smallest and the largest value.
    - "density": equally spaced in the cumulative distribution of the values.
    - "random": uniform between the smallest and the largest value, drawn from `rng`.

    Fewer values than `k`: "linear", "density" and "random" give "linear"; no value: zeros.
    """
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        return np.zeros(k, np.float32)
    if method == "kmeans++":
        return kmeans.kmeans_1d(values, k).astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    if method == "linear" or values.size < k:
        return np.linspace(lo, hi, k).astype(np.float32)
    if method == "random":
        return np.sort(rng.uniform(lo, hi, k)).astype(np.float32)
    if method == "density":
        # Equally spaced in the cumulative distribution of the weights.
        return np.quantile(values, np.linspace(0, 1, k)).astype(np.float32)
    raise ValueError(f"init_centroids: unknown method. Expected one of 'kmeans++', 'linear', "
                     f"'density', 'random'. Received: method={method!r}")


def kernel_centroids(view: np.ndarray, k: int, method: str, rng: np.random.Generator,
                     per_channel: bool, skip_zeros: bool) -> np.ndarray:
    """The initial centroids of a kernel seen as `(values, channels)` (`view_channels`):
    `(channels, k)` per channel, else `(k,)`; with `skip_zeros`, of its non-zero values only
    (zero being kept apart by the mask). "kmeans++" solves every channel at once
    (`kmeans.kmeans_1d` over the rows); the other methods go channel by channel through
    `init_centroids`."""
    view = np.asarray(view)
    if method == "kmeans++":
        rows = view.T if per_channel else view.reshape(1, -1)
        c = kmeans.kmeans_1d(rows, k, keep=rows != 0 if skip_zeros else None)
        c = c.astype(np.float32)
        return c if per_channel else c[0]

    def one(values):
        return init_centroids(values[values != 0] if skip_zeros else values, k, method, rng)
    return (np.stack([one(view[:, j]) for j in range(view.shape[1])]) if per_channel
            else one(view))


for _stock_class in SUPPORTED:  # registered at import: a saved model loads in a new process
    _compressible_class(_stock_class)
for _stock_class in (*CONTAINERS, *KERNEL_PARTS):
    if _stock_class not in WRAPPERS:
        _carrying_class(_stock_class)
del _stock_class
