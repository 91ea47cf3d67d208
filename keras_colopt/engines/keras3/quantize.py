"""Quantization-aware training of a Keras 3 model: which tensors get a fake-quant range,
and the layers without a kernel that carry one.

LiteRT runs an int8 model with one (scale, zero point) per activation tensor. The converter
takes each tensor's range from the FakeQuantWithMinMaxVars op that produced it in the
trained graph, so the graph fake-quantizes exactly the tensors the `.tflite` will hold:
the model inputs and every layer's output, except

  - a Conv2D/DepthwiseConv2D output that only a BatchNormalization reads (the converter
    folds the BN into the convolution's kernel and bias), and a linear convolution's or
    folded BN's output that only a ReLU/ReLU6 reads (fused into the op);
  - the outputs of layers that keep their input's scale (max pooling, reshapes, dropout,
    padding): LiteRT requires them to.

A Normalization runs as two int8 operators, SUB then MUL (by 1/std; ADD after MUL when
inverted), so the tensor between them gets a range too (`_colopt_pre`); without it the
converter leaves both in float between a DEQUANTIZE and a QUANTIZE.

A LayerNormalization runs as MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD; its
quantization-aware call computes it so, each of those tensors on its own range (the stock
layer converts with a NEG that LiteRT runs in float, even in a post-training int8 file).

MultiHeadAttention's projections are EinsumDense layers (the query's, key's and value's bias
is added after a RESHAPE, so the tensor before it gets a range too); the attention between
them (query * scale, BATCH_MATMUL, SOFTMAX, BATCH_MATMUL) is fake-quantized as LiteRT runs it,
the softmax on the fixed grid of LiteRT's int8 SOFTMAX. A SeparableConv2D runs as
DEPTHWISE_CONV_2D then a 1x1 CONV_2D: the tensor between them is ranged, and each kernel is its
part's (`compress.KERNEL_PARTS`), fake-quantized per channel.

A layer whose int8 form this engine does not know is refused before training, by name.
Weights need no range: `compress.fake_quant_weights` puts them on the converter's grid.
BatchNormalization normalizes with its moving statistics during the phase (it is folded
with them), as during a Cluster phase.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from keras_colopt.engines.keras3 import compat, compress
from keras_colopt.engines.keras3._deps import keras
from keras_colopt.engines.keras3.models import _is_graph

L = keras.layers
# Layers whose output keeps its input's quantization (no range of their own).
SAME_SCALE = (L.InputLayer, L.MaxPooling1D, L.MaxPooling2D, L.GlobalMaxPooling1D,
              L.GlobalMaxPooling2D, L.Flatten, L.Reshape, L.Dropout, L.SpatialDropout1D,
              L.SpatialDropout2D, L.ZeroPadding1D, L.ZeroPadding2D, L.Cropping2D, L.Identity)
# Layers whose output gets its own range.
RANGED = (L.BatchNormalization, L.ReLU, L.Activation, L.Softmax, L.Add, L.Subtract,
          L.Multiply, L.Average, L.Maximum, L.Concatenate, L.AveragePooling1D,
          L.AveragePooling2D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
          L.Rescaling, L.UpSampling2D, L.Normalization, L.LayerNormalization,
          *compress.SEPARABLE)
# Layers that LiteRT runs as two operators: the tensor between them is ranged too.
TWO_STEP = (L.Normalization,)
KNOWN = SAME_SCALE + RANGED
# keras.ops operations in a functional graph (not layers) whose int8 form is an elementwise
# operator on a tensor and a constant (the converter quantizes the constant).
CONSTANT_ARITHMETIC = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")
_FOLDS_BN = (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D)
# The containers whose computation QAT ranges (not a recurrent layer: `RECURRENT_REFUSAL`).
CONTAINERS = (L.MultiHeadAttention, *compress.SEPARABLE)
RECURRENT_REFUSAL = (
    "LiteRT has no int8 form of its loop, so QAT cannot train it as the file will run; its "
    "kernels take Prune and Cluster, and the post-training int8 export converts it unrolled "
    "over its fixed timesteps")


def _layer_norm_rows(layer) -> int:
    """The tensors inside a LayerNormalization LiteRT quantizes (`_layer_norm`), before its
    output: mean, x - mean, its square, variance, + epsilon, rsqrt, then (x - mean) * rsqrt
    and * gamma where something follows them."""
    return 6 + bool(layer.scale) + bool(layer.center)


def layer_norm_refusal(layer, node):
    """Why the quantization-aware LayerNormalization cannot compute `layer` as called at
    `node` (None: it can)."""
    if layer.rms_scaling:
        return "rms_scaling"
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    rank = len(node.arguments.keras_tensors[0].shape)
    if [a % rank for a in axes] != [rank - 1]:
        return f"axis={layer.axis}, not the last alone"
    return None


def attention_refusal(layer, node):
    """Why the quantization-aware MultiHeadAttention cannot compute `layer` as called at
    `node` (None: it can)."""
    parts = compat.attention_parts(layer)
    kwargs = node.arguments.kwargs
    if parts["gated"] or parts["sliding_window"] is not None:
        return "a gate or a sliding window"
    given = [k for k in ("attention_mask", "use_causal_mask", "query_mask", "value_mask",
                         "key_mask", "return_attention_scores") if kwargs.get(k) not in
             (None, False)]
    if given:
        return "called with " + ", ".join(given)
    return None


INNER = {L.LayerNormalization: _layer_norm_rows, L.MultiHeadAttention: lambda layer: 3,
         **{sep: lambda layer: 1 for sep in compress.SEPARABLE}}


def _observed_class(stock):
    if stock in compress._OBSERVED:
        return compress._OBSERVED[stock]
    if stock is L.MultiHeadAttention:
        return _container_class(stock, {compat.attention_method(): _attention})
    if stock in compress.SEPARABLE:
        return _container_class(stock, {"call": _separable_call})
    # A BatchNormalization normalizes with its moving statistics (it is folded with them).
    base = compress.MovingStatsBatchNormalization if stock is L.BatchNormalization else stock

    def call(self, inputs, *args, **kwargs):
        training = compress.is_training(self)
        if stock is L.Normalization:
            return compress.ranged_call(self, inputs, lambda i: _normalize(self, i, training),
                                        training)
        if stock is L.LayerNormalization:
            return compress.ranged_call(self, inputs, lambda i: _layer_norm(self, i, training),
                                        training)
        return compress.ranged_call(self, inputs, lambda i: base.call(self, i, *args, **kwargs),
                                    training)

    get_config, from_config = _config_methods(stock.get_config,
                                              lambda cls, config: stock.from_config(config),
                                              [False, True])
    return _observed(stock, base, {"call": call, "get_config": get_config,
                                   "from_config": from_config,
                                   "save_own_variables": compress.save_all_variables,
                                   "load_own_variables": compress.load_all_variables})


def _observed(stock, base, ns):
    """The observing subclass of `stock` on `base` with the methods `ns`, registered (so that
    a saved model loads in a new process) and recorded."""
    sub = type(stock.__name__, (base,), {
        **ns, "__module__": __name__,
        "__doc__": f"A {stock.__name__} whose tensors are fake-quantized (keras_colopt)."})
    sub.__qualname__ = f"quantized.{stock.__name__}"
    keras.saving.register_keras_serializable(package="keras_colopt",
                                             name="Quantized" + stock.__name__)(sub)
    compress._OBSERVED[stock] = sub
    return sub


def _config_methods(base_get_config, base_from_config, default_ranges):
    """`get_config` and `from_config` of a class made by `observe`: its base's, with which of
    its input and output have ranges (`observe` makes them again when it is loaded)."""
    def get_config(self):
        at = self.__dict__.get("_colopt_in_at")
        return {**base_get_config(self), "colopt_ranges": [
            at if at is not None else self._colopt_in is not None,
            self._colopt_out is not None]}

    def from_config(cls, config):
        config = dict(config)
        ranges = config.pop("colopt_ranges", default_ranges)
        layer = base_from_config(cls, config)
        observe(layer, *ranges)
        return layer
    return get_config, classmethod(from_config)


def _normalize(layer, inputs, training: bool):
    """Keras' Normalization, as LiteRT runs it: (x - mean) -> int8 -> * 1/std (inverted:
    x * std -> int8 -> + mean)."""
    ops = keras.ops
    mean = ops.convert_to_tensor(layer.mean)
    scale = ops.maximum(ops.sqrt(ops.convert_to_tensor(layer.variance)),
                        keras.config.epsilon())
    x = ops.convert_to_tensor(inputs, dtype=layer.compute_dtype)
    if layer.invert:
        return compress.fake_quant_range(x * scale, layer._colopt_pre, training) + mean
    return compress.fake_quant_range(x - mean, layer._colopt_pre, training) / scale


def _layer_norm(layer, inputs, training: bool):
    """Keras' LayerNormalization (over the last axis) as LiteRT runs it in int8, each
    intermediate tensor fake-quantized (`_layer_norm_rows`); the layer's output range is the
    last op's."""
    ops = keras.ops
    q = compress.InnerRanges(layer, training)
    x = ops.convert_to_tensor(inputs, dtype=layer.compute_dtype)
    mean = q(ops.mean(x, axis=-1, keepdims=True))
    d = q(x - mean)
    variance = q(ops.mean(q(d * d), axis=-1, keepdims=True))
    # On the int8 grid a small variance + epsilon rounds to 0, where rsqrt is infinite (and
    # its gradient NaN); LiteRT's RSQRT saturates at the top of its output's range. That range
    # is observed on the float rsqrt of the unrounded variance, as a post-training calibration
    # would: observed on the rounded one, it would reach 1/sqrt(epsilon) and scale every
    # small-variance token by it.
    exact = ops.rsqrt(ops.stop_gradient(ops.mean(d * d, axis=-1, keepdims=True))
                      + layer.epsilon)
    y = d * q(ops.rsqrt(ops.maximum(q(variance + layer.epsilon), layer.epsilon)),
              observed=exact)
    if layer.scale:
        y = q(y) * ops.cast(layer.gamma, y.dtype)
    if layer.center:
        y = q(y) + ops.cast(layer.beta, y.dtype)
    q.commit()
    return y


def _attention(self, query, key, value, attention_mask=None, training=None,
               return_attention_scores=False, **kwargs):
    """MultiHeadAttention's attention as LiteRT runs it in int8 (see the module's docstring)."""
    ops = keras.ops
    parts = compat.attention_parts(self)
    q = compress.InnerRanges(self, compress.is_training(self))
    query = q(query * ops.cast(parts["scale"], query.dtype))
    scores = q(ops.einsum(parts["scores_equation"], key, query))
    probs = compress.fake_quant_softmax(parts["masked_softmax"](scores, attention_mask))
    dropped = (parts["dropout_layer"](probs, training=training) if parts["dropout"] > 0
               else probs)
    out = q(ops.einsum(parts["combine_equation"], dropped, value))
    q.commit()
    return out, probs if return_attention_scores else None


def _separable_call(self, inputs):
    """SeparableConv2D (SeparableConv1D) as LiteRT runs it in int8: DEPTHWISE_CONV_2D, then
    (its output ranged) a 1x1 CONV_2D with the bias and the activation (fused, or ranged
    before it where LiteRT runs it on its own), each with its part's kernel."""
    ops = keras.ops
    compress.prune_parts(self)
    training = compress.is_training(self)
    depthwise, pointwise = compress.KERNEL_PARTS[compress._stock(type(self))]

    def compute(x):
        q = compress.InnerRanges(self, training)
        x = q(ops.depthwise_conv(x, getattr(self, depthwise), strides=self.strides,
                                 padding=self.padding, data_format=self.data_format,
                                 dilation_rate=self.dilation_rate))
        with keras.name_scope("pointwise"):  # the file names its operator '.../pointwise/...'
            x = ops.conv(x, getattr(self, pointwise), strides=1, padding="valid",
                         data_format=self.data_format)
        q.commit()
        if self.use_bias:
            x = x + ops.reshape(self.bias, (1, -1) + (1,) * self.rank
                                if self.data_format == "channels_first" else (-1,))
        if self._colopt_pre is not None:
            x = compress.fake_quant_range(x, self._colopt_pre, training)
        return self.activation(x) if self.activation is not None else x
    return compress.ranged_call(self, inputs, compute, training)


def _container_class(stock, methods):
    """A container (`compress.CONTAINERS`) computing as LiteRT runs it in int8, with its own
    ranges (`methods`: the methods that compute so), on the class that carries its kernels'
    compression in its config."""
    carrying = compress._carrying_class(stock)
    get_config, from_config = _config_methods(carrying.get_config,
                                              carrying.from_config.__func__, [False, False])
    return _observed(stock, carrying, {**methods, "get_config": get_config,
                                       "from_config": from_config})


def observe(layer, inputs, outputs: bool) -> None:
    """Gives a layer without a kernel fake-quant ranges on its input and/or output (a layer
    without weights is built from the start; a loaded or cloned BatchNormalization makes
    them when Keras builds it, before its saved values are loaded)."""
    stock = compress._stock(type(layer))
    object.__setattr__(layer, "__class__", _observed_class(stock))
    for attr in compress._RANGES:
        compress._set(layer, attr, None)
    between = stock in TWO_STEP or (stock in compress.SEPARABLE
                                    and compress.separate_activation(layer))
    inner = INNER[stock](layer) if stock in INNER else 0
    if layer.built:
        compress.add_ranges(layer, inputs, outputs, between, inner)
    else:
        compress.after_build(
            layer, lambda l: compress.add_ranges(l, inputs, outputs, between, inner))


def is_observed(layer) -> bool:
    return type(layer) in compress._OBSERVED.values()


# --------------------------------------------------------------------------- the plan

def _fuses_activation(layer) -> bool:
    """A ReLU or ReLU6 the converter fuses into the op before it."""
    stock = compress._stock(type(layer))
    if stock is L.ReLU:
        cfg = layer.get_config()
        return (cfg.get("max_value") in (None, 6.0) and not cfg.get("negative_slope")
                and not cfg.get("threshold"))
    if stock is L.Activation:
        return compress.activation_name(layer) in ("relu", "relu6")
    return False


def _linear(layer) -> bool:
    return compress.activation_name(layer) == "linear"


def _graph(model):
    return compat.sequential_functional(model) or model


def _bias_apart(layer, node) -> bool:
    """Whether LiteRT adds the layer's bias in an ADD of its own (`Adapter.bias_apart`): an
    EinsumDense by its equation, a Dense where it reads a sequence (rank > 2), which the
    converter runs as FULLY_CONNECTED, RESHAPE, ADD."""
    if not compress.supports(layer) or getattr(layer, "bias", None) is None:
        return False
    a = compress.adapter(layer)
    return a.bias_apart or (a.product is not None and
                            len(node.arguments.keras_tensors[0].shape) > 2)


def plan_ranges(model) -> Tuple[Dict[str, Tuple[bool, bool, bool]], List[str]]:
    """`({path name: (fake-quant input, fake-quant output, bias apart)}, [unknown layers])`
    over every layer of `model`, nested models included (a nested model itself carries no
    range). Fake-quant input: True, False or the position of the one input ranged; bias
    apart: `_bias_apart`."""
    flags, unknown = {}, []
    _plan(model, "", True, flags, unknown)
    return flags, unknown


def _plan(model, prefix, inputs_are_model_inputs, flags, unknown) -> None:
    g = _graph(model)
    consumers = {}
    fed_by_input = set()
    fed_by_op = {}  # layer -> the positions of its inputs a keras.ops operation computes
    ops = []  # the keras.ops operations of the graph (x + 3.0 in MobileNetV3's hard-swish)
    arity = {}  # layer -> how many tensors it is called on
    node_of = {}  # layer -> the node calling it (the last, for a layer called twice)
    for nodes in compat.nodes_by_depth(g).values():
        for node in nodes:
            arity[id(node.operation)] = len(node.arguments.keras_tensors)
            node_of[id(node.operation)] = node
            if not isinstance(node.operation, keras.layers.Layer):
                ops.append(node)
            for position, kt in enumerate(node.arguments.keras_tensors):
                producer = compat.keras_history(kt).operation
                consumers.setdefault(id(producer), []).append(node.operation)
                if isinstance(producer, L.InputLayer):
                    fed_by_input.add(id(node.operation))
                elif not isinstance(producer, keras.layers.Layer):
                    fed_by_op.setdefault(id(node.operation), []).append(position)
    outputs = {id(compat.keras_history(t).operation) for t in g.outputs}
    # An operation has no variables to hold its output's range: the layer reading it takes
    # it as an input range. Known: elementwise arithmetic with a constant on a layer's output
    # (not on a model input, which would then have no range), read by layers only.
    for node in ops:
        op = node.operation
        readers = consumers.get(id(op), [])
        if (type(op).__name__ not in CONSTANT_ARITHMETIC or id(op) in fed_by_input
                or len(node.arguments.keras_tensors) != 1 or id(op) in outputs or not readers
                or not all(isinstance(r, keras.layers.Layer) for r in readers)):
            unknown.append(f"{prefix}{op.name} (keras.ops {type(op).__name__})")
    only = {}  # layer -> the one layer reading its output (none for a model output)
    for layer in model.layers:
        readers = consumers.get(id(layer), [])
        if len(readers) == 1 and id(layer) not in outputs:
            only[id(layer)] = readers[0]
    folded = {id(r) for l in model.layers if (r := only.get(id(l))) is not None
              and compress.base_class(type(l)) in _FOLDS_BN and _linear(l)
              and compress._stock(type(r)) is L.BatchNormalization}  # folded into the conv
    for layer in model.layers:
        name = prefix + layer.name
        stock = compress._stock(type(layer))
        reader = only.get(id(layer))
        reads_input = id(layer) in fed_by_input and inputs_are_model_inputs
        if isinstance(layer, keras.Model) and _is_graph(layer):
            _plan(layer, name + "/", reads_input, flags, unknown)
            continue
        if stock is L.InputLayer:
            continue
        computed = fed_by_op.get(id(layer), [])
        if stock is L.MultiHeadAttention:  # the attention's ranges, then its projections'
            why = ("it reads a model input or a keras.ops operation" if reads_input or computed
                   else attention_refusal(layer, node_of[id(layer)]))
            if why:
                unknown.append(f"{name} (MultiHeadAttention: {why})")
                continue
            flags[name] = (False, False, False)
            flags.update({f"{name}/{sub}": (False, True, compress.adapter(s).bias_apart)
                          for sub, s in compress.sublayers(layer)})
            continue
        why = (layer_norm_refusal(layer, node_of[id(layer)])
               if stock is L.LayerNormalization else RECURRENT_REFUSAL
               if isinstance(layer, L.RNN) or stock is L.Bidirectional else None)
        if why:
            unknown.append(f"{name} ({stock.__name__}: {why})")
            continue
        if not (compress.quantizable(layer) or stock in KNOWN):
            unknown.append(name)
            continue
        if compress.supports(layer) and compress.own_call(layer):
            unknown.append(f"{name} (subclasses {compress.base_class(stock).__name__} with a "
                           "call of its own, whose added operations QAT does not range)")
            continue
        if compress.quantizable(layer) and compress.adapter(layer).table:
            flags[name] = (False, False, False)  # integer ids in; out on the table's grid
            continue
        into_folded_bn = reader is not None and id(reader) in folded
        # A linear op's (or a folded BN's) output that only a ReLU/ReLU6 reads is fused.
        into_fused_relu = reader is not None and _fuses_activation(reader) and (
            id(layer) in folded or (compress.supports(layer) or stock in compress.SEPARABLE)
            and _linear(layer))
        out = not (stock in SAME_SCALE or into_folded_bn or into_fused_relu)
        single = arity.get(id(layer), 1) == 1
        if computed and (len(computed) > 1 or reads_input or (
                not single and compress.supports(layer))):
            unknown.append(name)  # two input ranges: not yet
            continue
        # The input range: True (its one input, or a model input), or the position of the
        # one input an operation computes.
        flags[name] = (True if computed and single else computed[0] if computed
                       else reads_input, out, _bias_apart(layer, node_of[id(layer)]))
        # A separable convolution's kernels: fake-quantized weights (its own call ranges the
        # rest).
        flags.update({f"{name}/{sub}": (False, False, False)
                      for sub, _ in compress.sublayers(layer) if stock in compress.SEPARABLE})


for _stock_class in (*KNOWN, *CONTAINERS):  # registered at import: a saved model loads in a
    _observed_class(_stock_class)            # new process
del _stock_class
