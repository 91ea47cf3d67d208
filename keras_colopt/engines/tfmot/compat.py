"""Every private module and attribute of tf_keras and tensorflow-model-optimization (tfmot)
that the tfmot engine touches, each behind one name here, and why no public API does.

The rest of the engine uses these names and never names a private attribute or imports a
private module itself (`tests/test_compat.py` greps the package for that). Each entry of
`PRIVATE` is `name -> (what it touches, why)`: an accessor function, or a private module
imported once here (tfmot exports none of the wrapper, registry and quantizer classes the
engine must recognise). `tests/test_compat.py` runs one test per entry on a tiny real model
(a tf_keras Dense, a tfmot-wrapped layer), so an upgrade that renames or changes one fails
there, by the entry's name. A private module that moves fails earlier, at the import of this
module, with the module's path in the ImportError.

When one breaks after an upgrade: read how the new tf_keras/tfmot does the same thing (the
attribute's replacement, or a public API that now covers it), change only the entry here
(keeping what it returns), and check the entry's test again. Pinned versions are in
`pyproject.toml`.
"""

from __future__ import annotations

# First: tfmot is imported under the user's environment, which _deps then restores (the
# private modules below are already loaded by that import; these are lookups).
from keras_colopt.engines.tfmot import _deps  # noqa: F401
from tf_keras.src.saving import serialization_lib
from tensorflow_model_optimization.python.core.clustering.keras import (
    cluster_wrapper, clustering_registry)
from tensorflow_model_optimization.python.core.quantization.keras import (
    quantize_layer, quantize_wrapper)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (  # noqa: E501
    cluster_preserve_quantize_registry as cpq)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (  # noqa: E501
    prune_preserve_quantize_registry as ppq)
from tensorflow_model_optimization.python.core.sparsity.keras import (
    prune_registry, pruning_wrapper)

del _deps

__all__ = [  # the private modules are re-exported (the accessors are the functions below)
    "serialization_lib", "cluster_wrapper", "clustering_registry", "quantize_layer",
    "quantize_wrapper", "cpq", "ppq", "prune_registry", "pruning_wrapper", "PRIVATE"]

_TFMOT = "tensorflow_model_optimization.python.core."

PRIVATE = {
    # ---- private modules
    "serialization_lib": (
        "tf_keras.src.saving.serialization_lib",
        "SafeModeScope(safe_mode=False): rebuilding the user's live model from its layers' "
        "configs (a Lambda's code) without turning safe mode off for the whole process."),
    "cluster_wrapper": (
        _TFMOT + "clustering.keras.cluster_wrapper",
        "ClusterWeights, the class of tfmot's clustering wrapper: recognised to read, strip "
        "and build clustered layers (tfmot exports no name for it)."),
    "clustering_registry": (
        _TFMOT + "clustering.keras.clustering_registry",
        "ClusteringRegistry: which layers and weights tfmot clusters (supports(), "
        "_weight_names)."),
    "quantize_wrapper": (
        _TFMOT + "quantization.keras.quantize_wrapper",
        "QuantizeWrapper, the class of tfmot's QAT wrapper (the same class is public as "
        "tfmot.quantization.keras.QuantizeWrapper)."),
    "quantize_layer": (
        _TFMOT + "quantization.keras.quantize_layer",
        "QuantizeLayer, tfmot's input quantizer layer: left out when a QAT model is turned "
        "back into stock tf_keras layers (tfmot exports no name for it)."),
    "cpq": (
        _TFMOT + "quantization.keras.collab_opts.cluster_preserve."
        "cluster_preserve_quantize_registry",
        "CQAT/PCQAT: ClusterPreserveDefaultWeightsQuantizer and its CLUSTER_CENTROIDS and "
        "SPARSITY_MASK variable keys, read back from a wrapper; get_centroids, patched while "
        "quantize_apply runs to keep the plan's cluster layout."),
    "ppq": (
        _TFMOT + "quantization.keras.collab_opts.prune_preserve."
        "prune_preserve_quantize_registry",
        "PQAT: PrunePreserveDefaultWeightsQuantizer, recognised to read a wrapper's mask."),
    "prune_registry": (
        _TFMOT + "sparsity.keras.prune_registry",
        "PruneRegistry: which layers and weights tfmot prunes (supports(), _weight_names)."),
    "pruning_wrapper": (
        _TFMOT + "sparsity.keras.pruning_wrapper",
        "PruneLowMagnitude, the class of tfmot's pruning wrapper: recognised to read and "
        "strip pruned layers (tfmot exports no name for it)."),
    # ---- private attributes
    "is_graph_network": (
        "_is_graph_network",
        "tells a Functional model (a graph of layers tfmot can re-wrap) from a subclassed "
        "one: no public API does."),
    "output_layers": (
        "_output_layers",
        "the layers producing a Functional model's outputs, to give a re-wrapped model its "
        "output names back (matched by layer)."),
    "weight_vars": (
        "_weight_vars",
        "a QuantizeWrapper's (weight, quantizer, quantizer variables) triples: the kernel it "
        "fake-quantizes and how; no public API gives them."),
    "own_trainable_weights": (
        "_trainable_weights",
        "a layer's own list of trainable variables, edited in place to freeze a wrapped "
        "layer (assigning a new list would make tf_keras track the variables again)."),
    "own_non_trainable_weights": (
        "_non_trainable_weights",
        "a layer's own list of non-trainable variables, where a frozen variable is put."),
    "registry_weight_names": (
        "_weight_names",
        "the weights tfmot's Prune/ClusteringRegistry compresses in a layer it supports: no "
        "public API lists them."),
    "outbound_nodes": (
        "_outbound_nodes",
        "the nodes that call a layer's output: which activation follows a layer, and "
        "whether it has one consumer (activation folding)."),
    "inbound_nodes": (
        "_inbound_nodes",
        "the calls of a layer: a layer called more than once is not folded."),
    "flatten_to_reference_inputs": (
        "_flatten_to_reference_inputs",
        "a nested Functional model's call inputs flattened in its `inputs` order, as its "
        "own call flattens them (dicts keyed by input name)."),
    "expects_training_arg": (
        "_expects_training_arg",
        "whether a layer's call() takes `training`, to pass a nested model's training flag "
        "on to its layers when flattening it."),
    "nodes_by_depth": (
        "_nodes_by_depth",
        "a Functional model's graph nodes by depth: replaying the graph layer by layer, and "
        "each call's `training=` argument."),
    "tensor_usage_count": (
        "_tensor_usage_count",
        "how many times each tensor of a Functional graph is consumed, as tf_keras' own "
        "graph replay counts them."),
    "nested_inputs": (
        "_nested_inputs",
        "a Functional model's input structure (a dict, a list) to build a copy with the "
        "same one."),
    "nested_outputs": (
        "_nested_outputs",
        "a Functional model's output structure (a dict, a list) to build a copy with the "
        "same one."),
    "optimizer_learning_rate": (
        "_learning_rate",
        "an optimizer's learning rate as compiled, a LearningRateSchedule object where one "
        "was given: the public `learning_rate` returns its current value instead."),
    "legacy_learning_rate": (
        "_get_hyper",
        "the same for a legacy (tf_keras.optimizers.legacy) optimizer, which keeps it as a "
        "hyperparameter."),
    "user_loss_weights": (
        "_user_loss_weights",
        "the loss_weights model.compile was given (compiled_loss), to compile each phase's "
        "model the same way."),
    "user_metrics": (
        "_user_metrics",
        "the metrics model.compile was given (compiled_metrics), as given."),
    "user_weighted_metrics": (
        "_user_weighted_metrics",
        "the weighted_metrics model.compile was given (compiled_metrics), as given."),
    "run_eagerly_setting": (
        "_run_eagerly",
        "the run_eagerly model.compile was given (None when not given): the public "
        "`run_eagerly` resolves it to a bool."),
    "jit_compile_setting": (
        "_jit_compile",
        "the jit_compile model.compile was given."),
    "steps_per_execution": (
        "_steps_per_execution",
        "the steps_per_execution model.compile was given (a variable; None before "
        "compile)."),
}

_RAISE = object()


def is_graph_network(model) -> bool:
    """Whether a tf_keras model is a graph of layers (Functional, or a Sequential with an
    input) rather than subclassed (`model._is_graph_network`; False where absent)."""
    return getattr(model, "_is_graph_network", False)


def output_layers(model) -> list:
    """The layers producing a Functional model's outputs, in output order
    (`model._output_layers`)."""
    return model._output_layers


def weight_vars(layer) -> list:
    """A QuantizeWrapper's `[(weight, quantizer, quantizer variables)]`
    (`layer._weight_vars`; `[]` for any other layer)."""
    return getattr(layer, "_weight_vars", [])


def own_trainable_weights(layer) -> list:
    """The layer's own list of trainable variables, the live list
    (`layer._trainable_weights`): edits change what it trains."""
    return layer._trainable_weights


def own_non_trainable_weights(layer) -> list:
    """The layer's own list of non-trainable variables, the live list
    (`layer._non_trainable_weights`)."""
    return layer._non_trainable_weights


def registry_weight_names(registry, layer):
    """The names of the weights tfmot's `registry` (PruneRegistry or ClusteringRegistry)
    compresses in `layer` (`registry._weight_names(layer)`); a KeyError for a layer it wraps
    through its cells or sublayers (LSTM, MultiHeadAttention, ...)."""
    return registry._weight_names(layer)


def outbound_nodes(layer) -> list:
    """The nodes calling `layer`'s output (`layer._outbound_nodes`); each node's
    `outbound_layer` is the layer it calls."""
    return layer._outbound_nodes


def inbound_nodes(layer) -> list:
    """The nodes of `layer`'s calls (`layer._inbound_nodes`): one per call."""
    return layer._inbound_nodes


def flatten_to_reference_inputs(model, inputs) -> list:
    """`inputs` of a call of Functional `model`, flattened in `model.inputs` order
    (`model._flatten_to_reference_inputs(inputs)`)."""
    return model._flatten_to_reference_inputs(inputs)


def expects_training_arg(layer) -> bool:
    """Whether `layer`'s call() takes `training` (`layer._expects_training_arg`; False where
    absent)."""
    return getattr(layer, "_expects_training_arg", False)


def nodes_by_depth(model, default=_RAISE):
    """A Functional model's graph nodes, `{depth: [Node]}` (`model._nodes_by_depth`), each
    node with `layer`, `is_input`, `call_kwargs`, `flat_input_ids`, `flat_output_ids` and
    `map_arguments`. `default` where the model has none (an AttributeError if not given)."""
    if default is _RAISE:
        return model._nodes_by_depth
    return getattr(model, "_nodes_by_depth", default)


def tensor_usage_count(model):
    """How many times each tensor of a Functional graph is consumed, keyed by
    `str(id(tensor))` (`model._tensor_usage_count`)."""
    return model._tensor_usage_count


def nested_inputs(model):
    """A Functional model's inputs in the structure it was built with
    (`model._nested_inputs`; None where absent)."""
    return getattr(model, "_nested_inputs", None)


def nested_outputs(model):
    """A Functional model's outputs in the structure it was built with
    (`model._nested_outputs`; None where absent)."""
    return getattr(model, "_nested_outputs", None)


def optimizer_learning_rate(opt):
    """An optimizer's learning rate as built (`opt._learning_rate`): a variable, or the
    LearningRateSchedule object; None where absent (a legacy optimizer)."""
    return getattr(opt, "_learning_rate", None)


def legacy_learning_rate(opt):
    """A legacy optimizer's learning rate hyperparameter (`opt._get_hyper("learning_rate")`:
    a variable, or the LearningRateSchedule object); None for another optimizer."""
    if hasattr(opt, "_get_hyper"):
        return opt._get_hyper("learning_rate")
    return None


def user_loss_weights(compiled_loss):
    """The `loss_weights` given to compile, from `model.compiled_loss`
    (`._user_loss_weights`; None where absent)."""
    return getattr(compiled_loss, "_user_loss_weights", None)


def user_metrics(compiled_metrics):
    """The `metrics` given to compile, from `model.compiled_metrics` (`._user_metrics`;
    None where absent)."""
    return getattr(compiled_metrics, "_user_metrics", None)


def user_weighted_metrics(compiled_metrics):
    """The `weighted_metrics` given to compile, from `model.compiled_metrics`
    (`._user_weighted_metrics`; None where absent)."""
    return getattr(compiled_metrics, "_user_weighted_metrics", None)


def run_eagerly_setting(model):
    """The `run_eagerly` given to compile, None when not given (`model._run_eagerly`)."""
    return model._run_eagerly


def jit_compile_setting(model):
    """The `jit_compile` given to compile (`model._jit_compile`; None where absent)."""
    return getattr(model, "_jit_compile", None)


def steps_per_execution(model):
    """The `steps_per_execution` given to compile, a variable (`model._steps_per_execution`;
    None where absent)."""
    return getattr(model, "_steps_per_execution", None)
