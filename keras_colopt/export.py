"""Export to `.tflite`, and read back what survived in it.

`to_tflite` strips the training wrappers and converts; `inspect_tflite` reads
the weight tensors of a `.tflite` with LiteRT and reports their sparsity and
unique values (per tensor and per output channel); `evaluate_tflite` runs it.
int8 weights are stored densely: sparsity and clustering show in the gzip
size and in `inspect_tflite`, not in the raw file size.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import time
from typing import Dict, List, Optional

import numpy as np

from keras_colopt import _tf_compat, stats
from keras_colopt._files import check_writable, write_atomic  # noqa: F401 (public here too)

QUANTIZATIONS = ("int8", "dynamic", "float16", "none")
IO_TYPES = ("float32", "int8")
# The operators that hold weights -> the axis of their output channels.
_WEIGHT_OPS = {"CONV_2D": 0, "FULLY_CONNECTED": 0, "DEPTHWISE_CONV_2D": 3,
               "TRANSPOSE_CONV": 0, "CONV_3D": 4, "GATHER": 1}
# Which input holds the weights (1 where not named): a GATHER's table is its first.
_WEIGHT_INPUT = {"GATHER": 0}


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """A written `.tflite` file.

    Attributes:
        path: where it was written.
        quantization: the quantization used.
        tflite_bytes: file size.
        gzip_bytes: size after gzip -9 (what sparsity and clustering reduce).
        io: the type of its input and output tensors: "float32" (the file quantizes and
            dequantizes them itself) or "int8" (fully integer, batch axis fixed to 1).
        inputs, outputs: `{name: TensorIO}` of the file's input and output tensors (their
            dtype, shape and, for int8, scale and zero point: `real = scale * (q - zero_point)`).
        on_target: the file measured on `to_tflite`'s `target` (a `targets.TargetReport`),
            or None.
    """

    path: str
    quantization: str
    tflite_bytes: int
    gzip_bytes: int
    io: str = "float32"
    inputs: Dict[str, "TensorIO"] = dataclasses.field(default_factory=dict)
    outputs: Dict[str, "TensorIO"] = dataclasses.field(default_factory=dict)
    on_target: Optional[object] = None  # targets.TargetReport, with to_tflite(target=...)


@dataclasses.dataclass(frozen=True)
class TensorIO:
    """An input or output tensor of a `.tflite`: `dtype`, `shape` (-1: a dynamic axis) and,
    for an integer tensor, `scale` and `zero_point` (`real = scale * (q - zero_point)`)."""

    name: str
    dtype: str
    shape: tuple
    scale: Optional[float] = None
    zero_point: Optional[int] = None

    def quantize(self, x) -> np.ndarray:
        """`x` (real values) as this tensor takes them: rounded onto its grid and clipped
        to its integer type, or in the tensor's own type (float32; int32 token ids)."""
        if self.scale is None:
            return np.asarray(x).astype(self.dtype)
        x = np.asarray(x, dtype=np.float32)
        info = np.iinfo(self.dtype)
        return np.clip(np.round(x / self.scale + self.zero_point), info.min,
                       info.max).astype(self.dtype)

    def dequantize(self, q) -> np.ndarray:
        q = np.asarray(q)
        if self.scale is None:
            return q.astype(np.float32)
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


def _tensor_io(name, d) -> TensorIO:
    dtype = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    quantized = dtype.kind in "iu" and scale
    shape = d.get("shape_signature", d["shape"])
    return TensorIO(name=name, dtype=dtype.name, shape=tuple(int(v) for v in shape),
                    scale=float(scale) if quantized else None,
                    zero_point=int(zp) if quantized else None)


def _flatbuffer(path):
    """The `.tflite` as TensorFlow's flatbuffer tools read it (its first subgraph, and the
    name tables of operators and tensor types), without running it."""
    schema, flatbuffer_utils = _tf_compat.tflite_schema(), _tf_compat.flatbuffer_utils()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No .tflite file at {path!r}.")
    try:
        model = flatbuffer_utils.read_model(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - flatbuffers raises assorted types on junk
        raise ValueError(f"{os.fspath(path)!r} is not a .tflite file ({type(e).__name__}: "
                         f"{e}).") from None
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    return model, ops, types


def operators(path) -> List[str]:
    """The operators of a `.tflite`'s main graph, in order (e.g. `["QUANTIZE", "CONV_2D",
    ...]`), read from the file (not as LiteRT's delegates regroup them)."""
    model, names, _ = _flatbuffer(path)
    return [_op_name(model, names, op) for op in model.subgraphs[0].operators]


def _op_name(model, names, op) -> str:
    """An operator's name ("CONV_2D"), from its code (newer codes are in `builtinCode`, the
    first 127 also in `deprecatedBuiltinCode`)."""
    code = model.operatorCodes[op.opcodeIndex]
    return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


def _tensor_name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def inner_float_tensors(path) -> List[str]:
    """The float tensors of a `.tflite`'s main graph other than its inputs and outputs: none
    in a full-integer file (int8 operators throughout), some in a float or dynamic-range one."""
    model, _, types = _flatbuffer(path)
    graph = model.subgraphs[0]
    ends = set(int(i) for i in graph.inputs) | set(int(i) for i in graph.outputs)
    return [_tensor_name(t) for i, t in enumerate(graph.tensors)
            if types.get(t.type, "").startswith("FLOAT") and i not in ends]


def io_tensors(path):
    """`({input name: TensorIO}, {output name: TensorIO})` of a `.tflite`, named as in its
    signature (the Keras input and output names)."""
    return _io(_interpreter(path))


def _io(interp):
    ins, outs = _signature(interp)
    return ({n: _tensor_io(n, d) for n, d in ins.items()},
            {n: _tensor_io(n, d) for n, d in outs.items()})


def gzip_size(path_or_bytes) -> int:
    """Size in bytes of the gzip (level 9) compression of a file or a bytes object."""
    data = path_or_bytes
    if not isinstance(data, (bytes, bytearray)):
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    return len(gzip.compress(bytes(data), compresslevel=9, mtime=0))


def _check_target_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`path` must be a file path ending in .tflite. Received: path={path!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"Cannot write {path!r}: directory {folder!r} does not exist. Expected "
                         "an existing directory. Create it first (os.makedirs).")
    if os.path.isdir(path):
        raise ValueError(f"Cannot write {path!r}: it is a directory. Expected a file path such "
                         "as 'model.tflite'.")
    check_writable(folder, repr(path))
    return path


def _as_input(sample) -> np.ndarray:
    """One representative sample, batched, as the converter feeds it: float32, or int32
    for integer inputs (token ids of an Embedding)."""
    sample = np.asarray(sample)[None]
    return sample.astype(np.int32 if np.issubdtype(sample.dtype, np.integer) else np.float32)


def _representative(data, limit=256):
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        def gen():
            n = 0
            for batch in data:
                batch = batch[0] if isinstance(batch, (tuple, list)) else batch
                for sample in np.asarray(batch):
                    if n >= limit:
                        return
                    n += 1
                    yield [_as_input(sample)]
        return gen
    arr = np.asarray(data)
    if arr.ndim < 2 or len(arr) == 0:
        raise ValueError("`representative_data` must be a non-empty array of input samples "
                         f"(first axis = samples). Received an array of shape {arr.shape}.")

    def gen():
        for sample in arr[:limit]:
            yield [_as_input(sample)]
    return gen


def convert(model, quantization: str = "int8", representative_data=None,
            sparse: bool = False, io: str = "float32") -> bytes:
    """Converts a (possibly wrapped) model to `.tflite` bytes.

    Args:
        model: a tf_keras model; pruning/clustering wrappers are stripped, QAT
            wrappers are read by the converter (their ranges are used).
        quantization: `"int8"` (full-integer ops, float input/output),
            `"dynamic"` (int8 weights, float activations), `"float16"` or
            `"none"`. Defaults to `"int8"`.
        representative_data: input samples for calibrating `"int8"`: required
            when the model is not quantization-aware trained (post-training
            quantization), and used for the layers a partial QAT left out.
            Up to 256 are used.
        sparse: also store weights with the converter's sparse encoding
            (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`), so a pruned model is
            smaller without gzip. LiteRT's default XNNPACK delegate refuses
            sparse int8 weights: such a file runs with LiteRT's builtin kernels
            (`predict_tflite` falls back to them). Defaults to `False`.
        io: `"float32"` (float input and output tensors: the file quantizes and
            dequantizes them with QUANTIZE/DEQUANTIZE ops, and its batch axis stays
            dynamic) or `"int8"` (a fully integer file for a microcontroller or an NPU:
            int8 input and output tensors and the batch axis fixed to 1, so nothing but
            the model's own operators remains; `quantization="int8"` only). Defaults to
            `"float32"`.
    """
    from keras_colopt.engines import get_engine

    if io not in IO_TYPES:
        raise ValueError(f"Unknown `io`. Expected one of {IO_TYPES}. Received: io={io!r}")
    if io == "int8" and quantization != "int8":
        raise ValueError(f"io='int8' makes a fully integer file, which needs "
                         f"quantization='int8'. Received: quantization={quantization!r}. Pass "
                         "quantization='int8', or io='float32' for a float or dynamic file.")

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown `quantization`. Expected one of {QUANTIZATIONS}. "
                         f"Received: quantization={quantization!r}")
    engine = get_engine(model, compiled=False)
    stripped = engine.strip(model)
    qat = engine.is_qat(stripped)
    if quantization == "int8" and not qat and representative_data is None:
        raise ValueError(
            "int8 post-training quantization needs calibration data: this model was not "
            "quantization-aware trained. Expected `representative_data` (a few hundred "
            "input samples). Pass representative_data=x_train[:256], or train with a "
            "Quantize phase.")
    if not isinstance(sparse, bool):
        raise ValueError(f"`sparse` must be a bool. Received: sparse={sparse!r}")
    representative = (_representative(representative_data)
                      if quantization == "int8" and representative_data is not None else None)
    return engine.to_tflite_bytes(stripped, quantization, representative, sparse=sparse, qat=qat,
                                  io=io)


def to_tflite(model, path, quantization: str = "int8", representative_data=None,
              sparse: bool = False, log_dir=None, io: str = "float32",
              target=None) -> ExportInfo:
    """Strips the training wrappers, converts, and writes `path` atomically.

    The target directory is checked before converting, and the file is
    written to a temporary file first, then renamed: a failure never leaves a
    half-written file where a good one was.

    Args:
        model: a tf_keras model (e.g. `collaborative_fit(...).model`).
        path: the `.tflite` file to write.
        quantization: see `convert`. Defaults to `"int8"`.
        representative_data: see `convert`.
        sparse: see `convert`. Defaults to `False`.
        io: see `convert`: `"int8"` for a fully integer file with a static batch axis
            (microcontrollers, Ethos-U). Defaults to `"float32"`.
        log_dir: a run's TensorBoard log directory (the `log_dir` it was trained with):
            what survived in the file, per layer (`survival`), is written there for the
            keras_colopt dashboard. Defaults to `None` (nothing written).
        target: a deployment target (`targets.EthosU(...)`, `targets.LiteRTCPU()`): the
            file is measured on it (`info.on_target`), and with `log_dir` the dashboard's
            table of the file shows the target's figures per layer. Defaults to `None`.

    Returns:
        An `ExportInfo` with the raw and gzip sizes.

    Example:
        >>> info = to_tflite(result.model, "model.tflite", quantization="int8")
        >>> info.gzip_bytes
    """
    path = _check_target_path(path)
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise ValueError("`log_dir` must be a run's log directory or None. "
                         f"Received: log_dir={log_dir!r}")
    if target is not None and not callable(getattr(target, "measure", None)):
        raise ValueError("`target` must be a deployment target (colopt.targets.EthosU(...), "
                         f"colopt.targets.LiteRTCPU()) or None. Received: target={target!r}")
    data = convert(model, quantization, representative_data, sparse=sparse, io=io)
    write_atomic(path, data)
    on_target = None if target is None else target.measure(path)
    if log_dir is not None:
        from keras_colopt.tensorboard import summary

        table = dict(survival(path, model), quantization=quantization, io=io)
        if on_target is not None:  # its operators mapped to the layers survival found
            table["targets"] = [target_table(on_target, [r["layer"] for r in table["layers"]
                                                          if r["layer"]])]
        summary.tflite(log_dir, table)
    inputs, outputs = io_tensors(path)
    return ExportInfo(path=path, quantization=quantization, tflite_bytes=len(data),
                      gzip_bytes=gzip_size(data), io=io, inputs=inputs, outputs=outputs,
                      on_target=on_target)


def target_table(report, layer_names=()) -> dict:
    """A `targets.TargetReport` as the dashboard shows it: its figures, and per operator the
    Keras layer it belongs to (`layer_of` among `layer_names`; '' when none)."""
    table = report.as_dict()
    for row in table["layers"]:
        row["layer"] = layer_of(row["name"], layer_names)
    return table


def _interpreter(path, num_threads=None):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No .tflite file at {path!r}.")
    interp = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
    try:
        interp.allocate_tensors()
    except RuntimeError as e:
        if "delegate" not in str(e):
            raise
        # XNNPACK (LiteRT's default CPU delegate) refuses some files, e.g. sparse int8
        # weights; LiteRT's own builtin kernels run them.
        interp = Interpreter(model_path=os.fspath(path), num_threads=num_threads,
                             experimental_op_resolver_type=(
                                 OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        interp.allocate_tensors()
        interp.colopt_runtime = "builtin kernels (XNNPACK refused the file)"
    return interp


def runtime_of(path) -> str:
    """How LiteRT runs a `.tflite` on this CPU: `"xnnpack"` (its default delegate) or
    `"builtin kernels (XNNPACK refused the file)"`; raises when it cannot run it at all."""
    return getattr(_interpreter(path), "colopt_runtime", "xnnpack")


def strip(model):
    """The model as you built it, with its compression baked in: stock Keras layer classes
    (no masks, centroids, ranges or wrappers), the zeros and the shared values in each
    layer's `get_weights()`. `plain.set_weights(strip(m).get_weights())` works on your own
    architecture, and so do `save_weights`/`load_weights`, `model.save` and Keras 3's
    `model.export(format="litert")`.

    For a quantization-aware Keras 3 model, each kernel is the one the int8 `.tflite` holds,
    dequantized (its values on the int8 grid); the activations' ranges are gone, so the float
    model computes like the QAT model up to activation rounding. A tfmot quantization-aware
    model comes back as the stock layers it wraps, with the same kernels
    (`engines.tfmot.wrap._plain_qat`). `model` itself is not changed.

    Example:
        >>> plain = colopt.strip(result.model)
        >>> mine.set_weights(plain.get_weights())
    """
    from keras_colopt.engines import get_engine

    return get_engine(model, compiled=False).plain(model)


@dataclasses.dataclass(frozen=True)
class TFLiteWeight:
    """One weight tensor of a `.tflite`, as deployed.

    Attributes:
        name: the tensor's name in the file.
        op: the op that uses it (CONV_2D, FULLY_CONNECTED, ...).
        dtype: its stored type (int8 for int8 models).
        shape: its shape.
        sparsity: fraction of stored zeros.
        unique: distinct stored values over the tensor.
        unique_per_channel_max: most distinct stored values in one output channel.
        per_channel_quantized: whether it has one scale per output channel.
        entropy_bits: bits an ideal order-0 coder needs for its stored values
            (`stats.entropy_bits`): the limit for its compressed size.
    """

    name: str
    op: str
    dtype: str
    shape: tuple
    sparsity: float
    unique: int
    unique_per_channel_max: int
    per_channel_quantized: bool
    entropy_bits: float = 0.0

    def as_dict(self):
        return dataclasses.asdict(self)


def _weights(path):
    """(tensor description, op name, stored array) of every stored weight tensor of a
    `.tflite`: the filters of CONV_2D, FULLY_CONNECTED, DEPTHWISE_CONV_2D, ... (following a
    DEQUANTIZE for float16/dynamic files), in op order, read from the file's flatbuffer, in
    every subgraph (a recurrent loop's kernels are in its WHILE's body).
    A description is `{"name", "index", "quantization_parameters": {"scales",
    "zero_points", "quantized_dimension"}}`, as LiteRT's tensor details name them."""
    model, names, types = _flatbuffer(path)
    for graph in model.subgraphs:
        producer = {int(out): op for op in graph.operators for out in op.outputs}
        # A weight several operators share (an unrolled recurrent layer's, one per timestep)
        # is one tensor, listed once.
        seen = set()
        for op in graph.operators:
            name = _op_name(model, names, op)
            if name not in _WEIGHT_OPS or len(op.inputs) < 2:
                continue
            idx = int(op.inputs[_WEIGHT_INPUT.get(name, 1)])
            src = producer.get(idx)
            if src is not None and _op_name(model, names, src) == "DEQUANTIZE":
                idx = int(src.inputs[0])  # float16 / dynamic weights
            elif src is not None:
                continue  # a computed tensor, not a stored weight
            tensor = graph.tensors[idx]
            buffer = model.buffers[tensor.buffer]
            if buffer.data is None and not getattr(buffer, "offset", 0):
                continue  # a subgraph's input (a WHILE body's), not a stored weight
            if name == "GATHER" and (len(tensor.shape) < 2 or types[tensor.type] in (
                    "INT32", "INT64")):
                continue  # a shape or index table, not an embedding
            if idx in seen:
                continue
            seen.add(idx)
            yield _described(tensor, idx), name, _array(model, tensor, types)


def _described(tensor, index) -> dict:
    q = tensor.quantization
    return {"name": _tensor_name(tensor), "index": index,
            "quantization_parameters": {
                "scales": np.asarray([] if q is None or q.scale is None else q.scale,
                                     np.float32),
                "zero_points": np.asarray([] if q is None or q.zeroPoint is None
                                          else q.zeroPoint, np.int64),
                "quantized_dimension": 0 if q is None else int(q.quantizedDimension)}}


def _array(model, tensor, types) -> np.ndarray:
    """A constant tensor's stored values, as the file holds them (int8, float16, ...)."""
    dtype = np.dtype(types[tensor.type].lower())  # "INT8" -> int8, "FLOAT16" -> float16
    data = model.buffers[tensor.buffer].data
    raw = np.zeros(0, np.uint8) if data is None else np.asarray(data, np.uint8)
    return raw.view(dtype).reshape([int(d) for d in tensor.shape])


def read_weights(path) -> Dict[str, np.ndarray]:
    """`{tensor name: stored array}` of the weight tensors of a `.tflite` (int8 for int8
    models), as deployed."""
    return {t["name"]: w for t, _, w in _weights(path)}


def _describe(t, op_name, w) -> TFLiteWeight:
    q = t.get("quantization_parameters", {})
    scales = np.asarray(q.get("scales", []))
    axis = int(q.get("quantized_dimension", 0)) if scales.size > 1 else _WEIGHT_OPS[op_name]
    zero = np.asarray(q.get("zero_points", []))
    if zero.size and zero.any():  # asymmetric (a GATHER's table): a zero is stored as its point
        zero = zero.reshape([-1 if a == axis % w.ndim and zero.size > 1 else 1
                             for a in range(w.ndim)])
        counted = w.astype(np.int32) - zero
    else:
        counted = w
    s = stats.tensor_stats(t["name"], counted, channel_axis=axis if w.ndim > 1 else None)
    return TFLiteWeight(name=t["name"], op=op_name, dtype=str(w.dtype),
                        shape=tuple(int(d) for d in w.shape), sparsity=s.sparsity,
                        unique=s.unique,
                        unique_per_channel_max=int(s.unique_per_channel_max or s.unique),
                        per_channel_quantized=bool(scales.size > 1),
                        entropy_bits=stats.entropy_bits(w))


class TFLiteWeights(list):
    """The weight tensors of a `.tflite` (a list of `TFLiteWeight`), with its `inputs` and
    `outputs` (`{name: TensorIO}`: dtype, shape, and scale / zero point when integer)."""

    def __init__(self, weights, inputs, outputs):
        super().__init__(weights)
        self.inputs, self.outputs = inputs, outputs


def inspect_tflite(path) -> TFLiteWeights:
    """Per-weight-tensor sparsity, unique values and entropy of a `.tflite`, read with LiteRT,
    and its input and output tensors (`.inputs`, `.outputs`).

    Example:
        >>> weights = inspect_tflite("model.tflite")
        >>> for w in weights:
        ...     print(w.name, w.sparsity, w.unique_per_channel_max)
        >>> weights.inputs  # {'input': TensorIO(dtype='int8', shape=(1, 8, 8, 1), scale=...)}
    """
    return TFLiteWeights([_describe(t, op_name, w) for t, op_name, w in _weights(path)],
                         *_io(_interpreter(path)))


def layer_of(tensor_name: str, layer_names) -> str:
    """The Keras layer a `.tflite` tensor name belongs to ('' when none matches): a part of
    the name is the layer's (last path component of a nested layer's, every component where
    the file names them all) name, tfmot's `quant_<name>`, or Keras 3's export scope
    `<name>_<n>`; a SeparableConv2D's two operators are its 'depthwise' and 'pointwise'."""
    parts = [p for chunk in tensor_name.split(";") for p in chunk.split("/")]
    if re.fullmatch(r"separable_conv2d(_\d+)?", parts[-1]):
        # A Keras 3 SeparableConv2D's pointwise CONV_2D (its DEPTHWISE_CONV_2D's name ends in
        # '/depthwise'): the engine names its kernels 'sep/depthwise' and 'sep/pointwise'.
        parts.append("pointwise")

    def names(part, own):
        return part in (own, f"quant_{own}") or re.fullmatch(re.escape(own) + r"_\d+", part)

    def in_order(path):  # each component of the path, in order, among the parts
        rest = iter(parts)
        return all(any(names(p, own) for p in rest) for own in path.split("/"))
    ordered = sorted(layer_names, key=len, reverse=True)
    paths = [n for n in ordered if "/" in n]
    # A whole path first (a MultiHeadAttention's 'mha_2/query' among several 'query'), then a
    # layer's own name, then a path's last component (where the file does not name the nested
    # model): a DepthwiseConv2D 'dw' is not a SeparableConv2D's 'sep/depthwise'.
    for name in ([n for n in paths if in_order(n)] + [n for n in ordered if "/" not in n]
                 + paths):
        own = name.split("/")[-1]
        if any(names(p, own) for p in parts):
            return name
    return ""


def layers_of(path, kernels) -> List[str]:
    """The Keras layer of each weight tensor of a `.tflite` (in `inspect_tflite`'s order;
    '' where none), among `kernels` (`kernels.effective_kernels(model)`): by its name
    (`layer_of`), else, for a FULLY_CONNECTED weight the converter names after no layer (an
    unrolled recurrent layer's, 'arith.constant'), the kernel of its transposed shape whose
    signs it keeps (an LSTM's input and recurrent kernels often have the same shape)."""
    return _layers_of(list(_weights(path)), kernels)


def _layers_of(weights, kernels) -> List[str]:
    """`layers_of` for the `_weights` of a file, read once."""
    out = []
    for t, op_name, w in weights:
        layer = layer_of(t["name"], kernels)
        if not layer and op_name == "FULLY_CONNECTED" and w.ndim == 2:
            agree = {n: float(np.mean(np.sign(ks[0][1].T) == np.sign(w)))
                     for n, ks in kernels.items() if ks[0][1].shape == w.shape[::-1]}
            best = max(agree, key=agree.get, default="")
            layer = best if agree.get(best, 0.0) >= 0.9 else ""
        out.append(layer)
    return out


def survival(path, model=None) -> dict:
    """What survived in a `.tflite`, per weight tensor: as deployed (sparsity, unique values
    per tensor and per output channel, stored bytes and their gzip size) and, given the
    model it was exported from, the Keras layer it belongs to with that layer's statistics
    in Keras (`kernels.layer_stats`), in model order (tensors of no layer last).

    Returns:
        `{"file", "tflite_bytes", "gzip_bytes", "layers": [row, ...]}`, a row holding
        `layer` ('' when unknown), `tensor`, `op`, `dtype`, `shape`, `sparsity`, `unique`,
        `unique_per_channel`, `per_channel_quantized`, `bytes`, `gzip_bytes`,
        `keras_sparsity`, `keras_unique`, `keras_unique_per_channel` (None without a layer).

    Example:
        >>> for row in survival("model.tflite", model)["layers"]:
        ...     print(row["layer"], row["keras_sparsity"], "->", row["sparsity"])
    """
    weights = list(_weights(path))
    keras, layers = {}, [""] * len(weights)
    if model is not None:
        from keras_colopt.kernels import effective_kernels, layer_stats

        kernels = effective_kernels(model)
        keras, layers = layer_stats(model, kernels=kernels), _layers_of(weights, kernels)
    order = {name: i for i, name in enumerate(keras)}
    rows = []
    for (t, op_name, w), layer in zip(weights, layers):
        d = _describe(t, op_name, w)
        k = keras.get(layer)
        rows.append({"layer": layer, "tensor": d.name, "op": d.op, "dtype": d.dtype,
                     "shape": list(d.shape), "sparsity": d.sparsity, "unique": d.unique,
                     "unique_per_channel": d.unique_per_channel_max,
                     "per_channel_quantized": d.per_channel_quantized,
                     "bytes": int(w.nbytes), "gzip_bytes": gzip_size(w.tobytes()),
                     "keras_sparsity": None if k is None else k.sparsity,
                     "keras_unique": None if k is None else k.unique,
                     "keras_unique_per_channel": None if k is None else k.unique_per_channel_max})
    rows.sort(key=lambda r: order.get(r["layer"], len(order)))  # stable: file order within
    return {"file": os.path.abspath(os.fspath(path)), "tflite_bytes": os.path.getsize(path),
            "gzip_bytes": gzip_size(path), "layers": rows}


# tfmot's wrapper prefixes: a `.tflite` converted from a QAT model that did not keep the user's
# output names (a hand-written tfmot pipeline) names its outputs e.g. `quant_cls`.
_WRAPPER_PREFIXES = ("quant_", "prune_low_magnitude_", "cluster_")


def _signature(interp):
    """`({input name: details}, {output name: details})` of a loaded `.tflite`, named as in its
    signature (`details["index"]` is the tensor's index in `interp`).

    Only the signature maps the file's tensors to the Keras outputs reliably. Measured (TF
    2.21, LiteRT 2.3) on a tf_keras model whose outputs are `zeta`, `alpha`, `mid` in that
    Keras order, converted by `convert` plain (float and int8 PTQ) and QAT-wrapped: the
    signature's output names are the model's `output_names` (the user's names: the tfmot
    engine keeps them through its wrappers; without that they were `quant_zeta`, ...) and
    its input names the Keras `Input` names; but `get_output_details()` lists the plain
    file's outputs as [zeta, mid, alpha] and the QAT one's as [alpha, zeta, mid]: neither
    the Keras order nor the same order twice (the tensors are named
    `StatefulPartitionedCall:k` with `k` in the alphabetical order of the names). A file
    without a signature falls back to the tensor details, which are unambiguous only for
    one input and one output.
    """
    sigs = interp.get_signature_list()
    key = "serving_default" if "serving_default" in sigs else (
        next(iter(sigs)) if len(sigs) == 1 else None)
    if key is not None:
        runner = interp.get_signature_runner(key)
        return runner.get_input_details(), runner.get_output_details()
    return ({d["name"]: d for d in interp.get_input_details()},
            {d["name"]: d for d in interp.get_output_details()})


def output_names(path) -> List[str]:
    """The output names of a `.tflite` (the Keras model's output names), as `predict_tflite`'s
    `output=` takes them."""
    return list(_signature(_interpreter(path))[1])


def _pick_outputs(outs: dict, output, path) -> List[str]:
    names = list(outs)
    if isinstance(output, str) and output == "all":
        return names
    if output is None:
        if len(names) == 1:
            return names
        raise ValueError(
            f"{os.fspath(path)!r} has {len(names)} outputs: {names}. Expected `output` to name "
            f"the one to use (a Keras output name), or output='all' for a dict of every "
            f"output. Pass e.g. output={names[0]!r}. Received: output=None")
    if not isinstance(output, str):
        raise ValueError(f"`output` must be an output name, 'all' or None. Expected one of "
                         f"{names}. Received: output={output!r}")
    if output in outs:
        return [output]
    wrapped = [n for n in names if any(n == p + output for p in _WRAPPER_PREFIXES)]
    if len(wrapped) == 1:
        return wrapped
    raise ValueError(f"{os.fspath(path)!r} has no output named {output!r}. Expected one of "
                     f"{names} (the Keras model's output names). Received: output={output!r}")


def _feeds(ins: dict, x, path) -> Dict[str, np.ndarray]:
    names = list(ins)
    if isinstance(x, dict):
        if set(x) != set(names):
            raise ValueError(
                f"`x` must have one array per input of {os.fspath(path)!r}. Expected the keys "
                f"{names} (the Keras Input names). Received: x with keys {sorted(x)}")
        feeds = {n: np.asarray(x[n]) for n in names}
    elif len(names) == 1:
        feeds = {names[0]: np.asarray(x)}
    else:
        raise ValueError(
            f"{os.fspath(path)!r} has {len(names)} inputs: {names}. A list or an array cannot "
            "be matched to them (the file does not keep the Keras order of the inputs). "
            f"Expected a dict {{input name: array}}. Pass x={{{names[0]!r}: ..., ...}}. "
            f"Received: x of type {type(x).__name__}")
    if len({len(a) for a in feeds.values()}) != 1:
        raise ValueError("Every input of `x` must hold the same number of samples. Received: "
                         + ", ".join(f"{k}: {len(a)}" for k, a in feeds.items()))
    return feeds


def predict_tflite(path, x, batch_size: int = 256, output=None):
    """Runs a `.tflite` on `x` with LiteRT and returns the (dequantized) outputs.

    Args:
        path: the `.tflite` file.
        x: the inputs, first axis = samples: an array, or for a model with
            several inputs a dict `{Keras Input name: array}`.
        batch_size: samples per LiteRT invocation. Defaults to `256`.
        output: which output to return when the model has several: its Keras
            output name (`output_names(path)` lists them), or `"all"` for a
            dict `{name: array}` of every output. Defaults to `None`: the only
            output (a ValueError listing the names when there are several).

    Returns:
        A float32 array, or a dict of them with `output="all"`.

    Example:
        >>> predict_tflite("two_heads.tflite", xt, output="cls").shape
        (128, 10)
    """
    interp = _interpreter(path)
    ins, outs = _signature(interp)
    wanted = _pick_outputs(outs, output, path)
    feeds = _feeds(ins, x, path)
    tin = {n: _tensor_io(n, d) for n, d in ins.items()}
    tout = {n: _tensor_io(n, outs[n]) for n in wanted}
    # A file with a static batch axis (io="int8") runs that many samples per invocation.
    static = {t.shape[0] for t in tin.values() if t.shape and t.shape[0] > 0}
    step = min(static) if static else batch_size
    n = len(next(iter(feeds.values())))
    results = {name: [] for name in wanted}
    resized = None
    for start in range(0, n, step):
        chunks = {k: a[start:start + step] for k, a in feeds.items()}
        rows = len(next(iter(chunks.values())))
        if static and rows < step:  # the last, short chunk: padded to the file's batch
            chunks = {k: np.concatenate([a, np.repeat(a[-1:], step - rows, axis=0)])
                      for k, a in chunks.items()}
        shapes = {name: list(chunks[name].shape) for name in ins}
        if shapes != resized:
            for name, d in ins.items():
                interp.resize_tensor_input(d["index"], shapes[name])
            interp.allocate_tensors()
            resized = shapes
        for name, d in ins.items():  # an int8 input: quantized with the file's own parameters
            interp.set_tensor(d["index"], tin[name].quantize(chunks[name]))
        interp.invoke()
        for name in wanted:
            y = tout[name].dequantize(interp.get_tensor(outs[name]["index"]))
            results[name].append(y[:rows])
    merged = {name: np.concatenate(parts, axis=0) for name, parts in results.items()}
    return merged if output == "all" else merged[wanted[0]]


def evaluate_tflite(path, x, y, output=None) -> float:
    """Top-1 accuracy of a classification `.tflite` (or of one of its outputs) on `(x, y)`.

    Args:
        path: the `.tflite` file.
        x: the inputs, as for `predict_tflite`.
        y: integer labels; or a dict `{output name: labels}`, of which the
            `output`'s are used.
        output: the classification output to score when the model has
            several: its Keras output name. Defaults to `None`: the only
            output (a ValueError listing the names when there are several).

    Example:
        >>> evaluate_tflite("two_heads.tflite", xt, yt, output="cls")
        0.95
    """
    if isinstance(output, str) and output == "all":
        raise ValueError("evaluate_tflite scores one output. Expected `output` to name it. "
                         f"Received: output={output!r}")
    if isinstance(y, dict):
        key = output if output is not None else (next(iter(y)) if len(y) == 1 else None)
        if key not in y:
            raise ValueError(f"`y` is a dict: expected it to hold the labels of output "
                             f"{output!r}. Received: y with keys {sorted(y)}")
        y = y[key]
    pred = predict_tflite(path, x, output=output)
    return float(np.mean(np.argmax(pred, axis=-1) == np.asarray(y).reshape(-1)))


def latency_ms(path, sample, runs: int = 50, warmup: int = 5, num_threads: int = 1) -> float:
    """Median wall time of one inference of a `.tflite` on this CPU, in milliseconds.

    Runs LiteRT on one input (batch of 1) `warmup` times unmeasured, then
    `runs` times; the median is robust to the noise of a shared machine.

    Args:
        path: the `.tflite` file.
        sample: one input, with or without its batch axis (`x[0]` or `x[:1]`).
        runs: measured invocations. Defaults to `50`.
        warmup: unmeasured invocations first. Defaults to `5`.
        num_threads: LiteRT CPU threads. Defaults to `1` (what a small device has).
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"`runs` must be a positive int. Received: runs={runs!r}")
    interp = _interpreter(path, num_threads=num_threads)
    if len(interp.get_input_details()) != 1:
        raise ValueError(f"latency_ms feeds one input; {os.fspath(path)!r} has "
                         f"{len(interp.get_input_details())}. Expected a single-input model.")
    inp = interp.get_input_details()[0]
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim == len(inp["shape"]) - 1:
        x = x[None]
    x = x[:1]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = _tensor_io(inp["name"], inp).quantize(x)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
