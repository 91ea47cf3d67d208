"""Every private attribute of Keras 3 (and of TensorFlow, for this engine) that the keras3
engine touches, each behind one small accessor, and why no public API does.

The rest of the engine calls these functions and never names a private attribute itself
(`tests/test_compat.py` greps the package for that). Each entry of `PRIVATE` is
`accessor name -> (what it touches, why)`, and `tests/test_compat.py` runs one test per
entry on a tiny real model, so a Keras upgrade that renames or changes one fails there, by
the accessor's name.

When one breaks after an upgrade: read how the new Keras does the same thing (the
attribute's replacement, or a public API that now covers it), change only the accessor here
(keeping what it returns), and check the entry's test again. Pinned versions are in
`pyproject.toml`.
"""

from __future__ import annotations

PRIVATE = {
    "functional_class": (
        "keras.src.models.functional.Functional",
        "the class of a model built with keras.Model(inputs, outputs): Keras 3 exports no "
        "name for it, and a Functional model is told from a subclassed one by it."),
    "raw_kernel_attribute": (
        "_kernel",
        "the variable behind the public `kernel` property of Dense, Conv1D, Conv2D, Conv3D "
        "and EinsumDense: the compressible subclass overrides the property to return the "
        "effective kernel, so the raw variable is read and written by this name."),
    "attention_projections": (
        "_query_dense",
        "MultiHeadAttention's four EinsumDense projections (`_query_dense`, `_key_dense`, "
        "`_value_dense`, `_output_dense`), which it builds itself, outside the model's "
        "graph: the engine compresses them in place."),
    "attention_parts": (
        "_inverse_sqrt_key_dim",
        "MultiHeadAttention's scale, its two einsum equations, its masked softmax and "
        "dropout (`_inverse_sqrt_key_dim`, `_dot_product_equation`, `_combine_equation`, "
        "`_masked_softmax`, `_dropout_layer`, `_dropout`) and the options it has no public "
        "getter for (`_use_gate`, `_sliding_window`): quantization-aware training computes "
        "the attention as the layer does, with each tensor LiteRT quantizes fake-quantized."),
    "attention_method": (
        "_compute_attention",
        "the method MultiHeadAttention calls on its projected query, key and value, which "
        "its docstring invites a subclass to override: the quantization-aware subclass "
        "does."),
    "raw_embeddings_attribute": (
        "_embeddings",
        "the variable behind Embedding's public `embeddings` property, for the same reason."),
    "call_context": (
        "_get_call_context",
        "the `training` flag of the call being traced, read inside a compressible layer's "
        "call() (which is not passed `training`): no public API gives it."),
    "tracker": (
        "_tracker",
        "the tracker Keras locks after build: unlocked for a moment to add a variable to a "
        "built layer (a mask, centroids, ranges) with no public API to do so."),
    "untrack_variable": (
        "_untrack_variable",
        "drops a variable of ours (mask, centroids, ranges) from a layer's weights when "
        "compression is baked in: no public API removes a weight."),
    "loss_tracker": (
        "_loss_tracker",
        "the Mean behind the `loss` a Model logs: a distillation train_step updates it as "
        "Keras' own train_step does, so History's `loss` keeps its meaning."),
    "sequential_functional": (
        "_functional",
        "the Functional graph a Sequential model builds inside itself: its nodes say which "
        "layer reads which (the ranges quantization-aware training places)."),
    "nodes_by_depth": (
        "_nodes_by_depth",
        "a Functional model's graph nodes by depth: who consumes each layer's output, which "
        "no public API lists."),
    "keras_history": (
        "_keras_history",
        "the operation that produced a symbolic KerasTensor: links a node's inputs to their "
        "producing layers (no public API)."),
    "compile_config": (
        "_compile_config",
        "what model.compile was given (loss, loss_weights, metrics, ...), to compile each "
        "phase's model the same way: get_compile_config() returns it serialized instead."),
    "optimizer_learning_rate": (
        "_learning_rate",
        "the optimizer's learning rate as compiled, a LearningRateSchedule object where one "
        "was given: the public `learning_rate` returns its current value instead."),
    "omit_frequent_tracing_warning": (
        "tf.function._omit_frequent_tracing_warning",
        "TensorFlow's switch that silences its 'retracing' warning for one tf.function: "
        "each layer's effective-kernel function is traced once, but TensorFlow counts the "
        "traces of all of them together."),
}


def functional_class():
    """Keras 3's private Functional model class (`keras.src.models.functional.Functional`):
    tells a Functional model from a subclassed one (no public name for the class)."""
    from keras.src.models.functional import Functional

    return Functional


def raw_kernel_attribute() -> str:
    """The name of the private attribute holding the kernel variable of Dense, Conv1D,
    Conv2D, Conv3D and EinsumDense (`_kernel`): their `kernel` is a property, which the
    compressible subclass overrides."""
    return "_kernel"


def attention_projections(layer) -> list:
    """A built MultiHeadAttention's query, key, value and output EinsumDense layers
    (`layer._query_dense`, ...), in that order."""
    return [getattr(layer, a) for a in ("_query_dense", "_key_dense", "_value_dense",
                                        "_output_dense")]


def attention_parts(layer) -> dict:
    """What a built MultiHeadAttention computes its attention with (see PRIVATE)."""
    return {"scale": float(layer._inverse_sqrt_key_dim),
            "scores_equation": layer._dot_product_equation,
            "combine_equation": layer._combine_equation,
            "masked_softmax": layer._masked_softmax,
            "dropout": float(layer._dropout), "dropout_layer": layer._dropout_layer,
            "gated": bool(getattr(layer, "_use_gate", False)),
            "sliding_window": getattr(layer, "_sliding_window", None)}


def attention_method() -> str:
    """The name of the method MultiHeadAttention computes attention in (`_compute_attention`,
    `(query, key, value, attention_mask, training, return_attention_scores, ...)` ->
    `(output, scores or None)`)."""
    return "_compute_attention"


def raw_embeddings_attribute() -> str:
    """The name of the private attribute holding Embedding's table (`_embeddings`): its
    `embeddings` is a property, which the compressible subclass overrides."""
    return "_embeddings"


def call_context(layer):
    """The Keras call context of the call `layer` is in (`layer._get_call_context()`): its
    `training` is the flag of the current call, which a layer's call() may not be passed."""
    return layer._get_call_context()


def tracker(obj):
    """The tracker of a layer or model (`obj._tracker`), which Keras locks after build; it
    has `locked`, `lock()` and `unlock()`."""
    return obj._tracker


def untrack_variable(layer, var) -> None:
    """Removes `var` from `layer`'s weights (`layer._untrack_variable(var)`)."""
    layer._untrack_variable(var)


def loss_tracker(model):
    """The Mean metric behind the `loss` a compiled model logs (`model._loss_tracker`)."""
    return model._loss_tracker


def sequential_functional(model):
    """The Functional graph a Sequential model keeps inside itself (`model._functional`);
    `None` for a model without one (a Functional model itself)."""
    return getattr(model, "_functional", None)


def nodes_by_depth(graph):
    """A Functional graph's nodes by depth (`graph._nodes_by_depth`): `{depth: [Node]}`,
    each node with `operation` and `arguments.keras_tensors`."""
    return graph._nodes_by_depth


def keras_history(tensor):
    """The history of a symbolic KerasTensor (`tensor._keras_history`): its `operation` is
    the layer that produced it."""
    return tensor._keras_history


def compile_config(model):
    """What `model.compile` was given (`model._compile_config`, a serializable holder whose
    `config` is the keyword arguments); `None` for a model never compiled."""
    return getattr(model, "_compile_config", None)


def optimizer_learning_rate(opt):
    """The learning rate an optimizer was built with (`opt._learning_rate`): a variable, or
    the LearningRateSchedule object itself; `None` where it has none."""
    return getattr(opt, "_learning_rate", None)


def omit_frequent_tracing_warning(fn) -> None:
    """Silences TensorFlow's 'retracing' warning for one `tf.function`
    (`fn._omit_frequent_tracing_warning = True`)."""
    fn._omit_frequent_tracing_warning = True

