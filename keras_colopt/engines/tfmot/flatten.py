"""Nested models (a backbone inside a model, as in transfer learning) for the tfmot engine.

tfmot wraps the layers a model lists in `model.layers`; a nested Sequential or
Functional model is one of them, and tfmot leaves the layers inside it as they
are. Two answers here:

- `flatten_nested(model)`: one Functional model computing the same function
  with the same weights, whose layers are the nested models' layers, named by
  their path (`mobilenet_0.25_32/conv_pw_1`). `collaborative_fit` runs its
  phases on it, so they reach every layer.
- `walk(model)`: every layer at any depth with its path name, for reading a
  model that is used as it is (the drop-in callbacks in a plain `model.fit`).

The path separator is "/", so the names in logs, TensorBoard tags and errors
read `backbone/layer`. Measured with tf_keras 2.21 and tfmot 0.8.1 on a
flattened MobileNet (`mobilenet_0.25_32/conv_pw_1`: the "." is fine too): such
names go through `clone_model`, get_config/from_config, get_weights/set_weights,
`prune_low_magnitude`, `cluster_weights`, `quantize_model` and `quantize_apply`
with the cluster-preserving scheme, `tf.train.Checkpoint`, `.keras`/`.h5`/
SavedModel saving and `.tflite` conversion; variables are named
`mobilenet_0.25_32/conv_pw_1/kernel:0`, .tflite tensors
`<model>/quant_mobilenet_0.25_32/conv_pw_1/Conv2D...`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from keras_colopt.engines.tfmot import compat
from keras_colopt.engines.tfmot._deps import tf, tf_keras
from keras_colopt.engines.tfmot.layers import base_layer

SEP = "/"


def _is_nested(layer) -> bool:
    """Whether `layer` is a Sequential or Functional model (which can be flattened)."""
    return isinstance(layer, tf_keras.Model) and (
        isinstance(layer, tf_keras.Sequential) or compat.is_graph_network(layer))


def walk(model, prefix: str = "") -> List[Tuple[str, object]]:
    """Every layer of `model`, nested models opened at any depth, with its path name.

    Args:
        model: a tf_keras model, wrapped or not.
        prefix: prepended to every name. Defaults to `""`.

    Returns:
        `[(path name, layer)]` in layer order: a layer of a nested model
        `backbone` reads `backbone/conv1` (its base name inside any tfmot
        wrapper); the nested models themselves are not listed, their layers are
        (but for their InputLayers).

    Example:
        >>> [name for name, _ in walk(model)]
        ['mobilenet_0.25_32/conv1', ..., 'global_average_pooling2d', 'dense']
    """
    out = []
    for layer in model.layers:
        if _is_nested(layer):
            out += walk(layer, prefix + layer.name + SEP)
        elif prefix and isinstance(layer, tf_keras.layers.InputLayer):
            continue  # a nested model's input is the tensor it is called on
        else:
            out.append((prefix + base_layer(layer).name, layer))
    return out


def nested_models(model, prefix: str = "") -> List[str]:
    """Path names of the Sequential/Functional models nested in `model`, at any depth
    (outer ones first); `[]` when there is none."""
    out = []
    for layer in model.layers:
        if _is_nested(layer):
            out.append(prefix + layer.name)
            out += nested_models(layer, prefix + layer.name + SEP)
    return out


def flatten_nested(model):
    """One Functional model with the layers of `model`'s nested models in its own graph.

    The result computes the same function with the same weights (copies of
    them: `model` is not modified and shares nothing with the result). A layer
    of a nested model is named by its path, `backbone/conv1` (`outer/inner/conv1`
    at depth two). What the nested calls said is kept: the `training=` a nested
    model was called with (`backbone(x, training=False)` keeps the BatchNorm
    layers inside it in inference mode) goes to each layer inside it that
    takes `training` and was not called with its own; a frozen nested model
    (`trainable=False`) leaves its layers frozen; nested models with several
    inputs or outputs, and nested models inside nested models, are opened.
    A nested subclassed model cannot be opened and stays one layer.

    Args:
        model: a tf_keras Sequential or Functional model, not wrapped by tfmot.

    Returns:
        `model` itself when it has no nested model, otherwise a new Functional
        model named like `model`.

    Raises:
        ValueError: a nested model is called more than once (its weights are
            shared between the calls).

    Example:
        >>> backbone = tf_keras.applications.MobileNet(include_top=False, weights=None,
        ...     alpha=0.25, input_shape=(32, 32, 3))
        >>> model = tf_keras.Sequential([backbone, tf_keras.layers.GlobalAveragePooling2D(),
        ...                              tf_keras.layers.Dense(10)])
        >>> flatten_nested(model).get_layer("mobilenet_0.25_32/conv_pw_1")
    """
    if not nested_models(model):
        return model
    copies: Dict[int, Tuple[object, object]] = {}   # id(original) -> (copy, original)
    opened: Dict[int, str] = {}                      # id(nested model) -> its path

    def emit(layer, args, kwargs, prefix, training, trainable):
        path = prefix + layer.name
        if _is_nested(layer):
            if id(layer) in opened:
                raise ValueError(
                    f"flatten_nested: nested model '{layer.name}' is called more than once in "
                    f"model '{model.name}' (at '{opened[id(layer)]}' and at '{path}'), sharing "
                    "its weights between the calls. Flattening turns a nested model's layers "
                    "into layers of the outer graph, one copy per call: their weights would no "
                    "longer be tied, and the model would compute another function once "
                    "trained. Expected each nested model to be called once. Call it once (e.g. "
                    "on the inputs concatenated along the batch axis), or give each call its "
                    "own copy (tf_keras.models.clone_model) if the weights need not stay tied. "
                    f"Received: model '{model.name}' calling '{layer.name}' at least twice")
            opened[id(layer)] = path
            inner = kwargs.get("training", training)  # an explicit argument wins, as in Keras
            inputs = args[0] if args else kwargs.get("inputs")
            flat = (tf.nest.flatten(inputs) if isinstance(layer, tf_keras.Sequential)
                    else compat.flatten_to_reference_inputs(layer, inputs))
            out = _replay(layer, list(flat), lambda l, a, k: emit(
                l, a, k, path + SEP, inner, trainable and layer.trainable))
            return _outputs_like(layer, out)
        entry = copies.get(id(layer))
        if entry is None:
            config = layer.get_config()
            config["name"] = path
            copy = layer.__class__.from_config(config)
            copy.trainable = bool(trainable and layer.trainable)
            copies[id(layer)] = entry = (copy, layer)
        if training is not None and "training" not in kwargs and \
                compat.expects_training_arg(layer):
            kwargs = dict(kwargs, training=training)
        return entry[0](*args, **kwargs)

    inputs = _new_inputs(model)
    outputs = _replay(model, inputs, lambda l, a, k: emit(l, a, k, "", None, True))
    for copy, original in copies.values():
        copy.set_weights(original.get_weights())
    return _functional_like(model, inputs, outputs)


def restore_training_args(model, reference):
    """`model` with the `training=` call arguments its layers have in `reference`.

    tfmot's quantize_apply rebuilds the connections of the layers it matches
    as a pattern (Conv2D -> BatchNormalization -> ReLU) without their call
    arguments: a `BatchNormalization` that `flatten_nested` calls with
    `training=False` (a backbone called with `training=False`) would run in
    training mode during QAT, updating its statistics. Here such layers get
    their argument back (a wrapper passes it on to its layer, and to its own
    quantizers: a BatchNormalization fused after a convolution has none).

    Args:
        model: a Functional model built from `reference` by tfmot (its layers
            named like `reference`'s, or inside wrappers of that name).
        reference: the model as it was before.

    Returns:
        `model` itself when no argument was lost, otherwise a new Functional
        model calling the same layer objects (weights and wrappers shared).
    """
    wanted = _training_args(reference)
    if not wanted:
        return model
    have = _training_args(model)
    lost = {}
    for layer in model.layers:
        name = base_layer(layer).name
        if name in wanted and have.get(name) != wanted[name]:
            lost[layer.name] = wanted[name]
    if not lost:
        return model

    def call(layer, args, kwargs):
        if layer.name in lost:
            kwargs = dict(kwargs, training=lost[layer.name])
        return layer(*args, **kwargs)
    inputs = _new_inputs(model)
    return _functional_like(model, inputs, _replay(model, inputs, call))


def _training_args(model) -> Dict[str, object]:
    """{base layer name: the `training=` it is called with} in `model`'s own graph."""
    out = {}
    for depth_nodes in compat.nodes_by_depth(model, {}).values():
        for node in depth_nodes:
            if not node.is_input and "training" in node.call_kwargs:
                out[base_layer(node.layer).name] = node.call_kwargs["training"]
    return out


def _new_inputs(model) -> list:
    names = getattr(model, "input_names", None) or [None] * len(model.inputs)
    return [tf_keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=name)
            for t, name in zip(model.inputs, names)]


def _functional_like(model, inputs, outputs):
    """A Functional model on new `inputs`/`outputs` (flat lists) structured like `model`'s."""
    nested_in = compat.nested_inputs(model)
    nested_out = compat.nested_outputs(model)
    return tf_keras.Model(
        tf.nest.pack_sequence_as(nested_in, inputs) if nested_in is not None else inputs,
        tf.nest.pack_sequence_as(nested_out, outputs) if nested_out is not None else outputs,
        name=model.name)


def _outputs_like(model, flat):
    """Flat output tensors in the structure `model` returns them in."""
    structure = compat.nested_outputs(model)
    if isinstance(model, tf_keras.Sequential) or structure is None:
        return flat[0] if len(flat) == 1 else flat
    return tf.nest.pack_sequence_as(structure, flat)


def _replay(model, flat_inputs, call) -> list:
    """Runs `model`'s graph on `flat_inputs` (aligned with `model.inputs`) as its own call
    would, with `call(layer, args, kwargs)` in place of each layer call; returns the
    outputs, flat (aligned with `model.outputs`)."""
    if isinstance(model, tf_keras.Sequential):
        x = flat_inputs[0]
        for layer in model.layers:
            x = call(layer, (x,), {})
        return tf.nest.flatten(x)
    counts = compat.tensor_usage_count(model)
    tensors = {}
    for x, y in zip(model.inputs, flat_inputs):
        tensors[str(id(x))] = [y] * counts[str(id(x))]
    nodes = compat.nodes_by_depth(model)
    for depth in sorted(nodes, reverse=True):
        for node in nodes[depth]:
            if node.is_input or any(i not in tensors for i in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            out = call(node.layer, args, kwargs)
            for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(out)):
                tensors[x_id] = [y] * counts[x_id]
    return [tensors[str(id(x))].pop() for x in model.outputs]
