"""compat: every private attribute of Keras 3, tf_keras, tfmot, TF Lite and LiteRT the package
touches, each exercised by name on the smallest real object, so an upgrade that renames or
changes one fails here (`test_private_entry[keras3-nodes_by_depth]`), not deep in a phase.

Also: each compat module's PRIVATE table lists exactly its accessors, and no other module of
the package names one of those private attributes or imports a private module itself.
"""

import ast
import inspect
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_colopt
from keras_colopt import _tf_compat, export
from keras_colopt.engines.keras3 import compat as k3
from keras_colopt.engines.keras3._deps import keras
from keras_colopt.engines.tfmot import compat as tm
from keras_colopt.engines.tfmot._deps import tfmot

COMPAT = {"keras3": k3, "tfmot": tm, "tf": _tf_compat}
ENTRIES = [(flavour, name) for flavour, module in COMPAT.items() for name in module.PRIVATE]
CHECKS = {}  # (flavour, entry name) -> check(accessor)


def check(flavour, name):
    def register(fn):
        CHECKS[(flavour, name)] = fn
        return fn
    return register


@pytest.mark.parametrize("flavour,name", ENTRIES, ids=[f"{f}-{n}" for f, n in ENTRIES])
def test_private_entry(flavour, name, request):
    """Runs the entry's check on its accessor (and on the fixtures its other arguments name)."""
    assert (flavour, name) in CHECKS, f"no check in tests/test_compat.py for {flavour}:{name}"
    fn = CHECKS[(flavour, name)]
    extra = [request.getfixturevalue(p) for p in list(inspect.signature(fn).parameters)[1:]]
    fn(getattr(COMPAT[flavour], name), *extra)


# --------------------------------------------------------------------------- tables

@pytest.mark.parametrize("flavour", COMPAT)
def test_each_table_lists_exactly_its_accessors(flavour):
    module = COMPAT[flavour]
    defined = {n for n, v in vars(module).items() if not n.startswith("_") and (
        (inspect.isfunction(v) and v.__module__ == module.__name__) or inspect.ismodule(v))}
    assert defined == set(module.PRIVATE), (
        f"{module.__name__}: accessors not in PRIVATE: {sorted(defined - set(module.PRIVATE))}"
        f"; PRIVATE entries with no accessor: {sorted(set(module.PRIVATE) - defined)}")
    for name, (touches, reason) in module.PRIVATE.items():
        assert touches and len(reason) > 20, f"{flavour}:{name} needs what it touches and why"
        accessor = getattr(module, name)
        if inspect.isfunction(accessor):
            assert accessor.__doc__, f"{module.__name__}.{name} has no docstring"
        else:  # a private module imported once
            assert accessor.__name__ == touches, (name, accessor.__name__, touches)
    assert CHECKS.keys() >= {(flavour, n) for n in module.PRIVATE}


_PRIVATE_PACKAGES = ("keras.src", "tf_keras.src", "tensorflow.python", "tensorflow.lite.python",
                     "tensorflow.lite.tools", "tensorflow_model_optimization.python")


def _private_names():
    """(attribute names, module paths) that only a compat module may name."""
    attrs, modules = set(), set(_PRIVATE_PACKAGES)
    for module in COMPAT.values():
        for touches, _ in module.PRIVATE.values():
            last = touches.rsplit(".", 1)[-1]
            if last.startswith("_"):
                attrs.add(last)
            else:
                modules.add(touches)
    return attrs, modules


def _uses(tree, attrs, modules):
    def private_module(path):
        return any(path == m or path.startswith(m + ".") for m in modules)

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in attrs:
            yield node.lineno, node.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value in attrs:  # getattr(x, "_name"), hasattr(x, "_name")
            yield node.lineno, repr(node.value)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if private_module(alias.name):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if private_module(node.module) or private_module(full):
                    yield node.lineno, full


def test_no_private_name_outside_the_compat_modules():
    attrs, modules = _private_names()
    root = pathlib.Path(keras_colopt.__file__).parent
    allowed = {pathlib.Path(m.__file__).resolve() for m in COMPAT.values()}
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.resolve() in allowed:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, what in _uses(tree, attrs, modules):
            found.append(f"{os.path.relpath(path, root.parent)}:{line}: {what}")
    assert not found, ("private names used outside the compat modules (add an accessor to "
                       "the engine's compat.py and call it):\n" + "\n".join(found))


def test_the_grep_finds_each_kind_of_use():
    attrs, modules = _private_names()
    source = ("import tensorflow.python.ops\n"
              "from tensorflow_model_optimization.python.core.sparsity.keras import x\n"
              "from keras.src.models.functional import Functional\n"
              "y = model._nodes_by_depth\n"
              "z = getattr(layer, '_weight_vars', [])\n"
              "'''a docstring naming _weight_vars is fine'''\n")
    assert [line for line, _ in _uses(ast.parse(source), attrs, modules)] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- Keras 3

def _k3_graph():
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="h")(x)
    out = keras.layers.Dense(2, name="out")(h)
    return keras.Model(x, out, name="g")


@check("keras3", "functional_class")
def _(functional_class):
    class Sub(keras.Model):
        def call(self, x):
            return x
    assert isinstance(_k3_graph(), functional_class())
    assert not isinstance(Sub(), functional_class())
    assert not isinstance(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                          functional_class())


@check("keras3", "raw_kernel_attribute")
def _(raw_kernel_attribute):
    name = raw_kernel_attribute()
    for layer, shape in ((keras.layers.Dense(2), (None, 4)),
                         (keras.layers.Conv1D(2, 3), (None, 5, 4)),
                         (keras.layers.Conv2D(2, 3), (None, 5, 5, 4)),
                         (keras.layers.Conv3D(2, 3), (None, 5, 5, 5, 4)),
                         (keras.layers.EinsumDense("ab,bc->ac", 2), (None, 4))):
        # `kernel` is a property (the compressible subclass overrides it) over this variable.
        assert isinstance(inspect.getattr_static(type(layer), "kernel"), property)
        layer.build(shape)
        raw = getattr(layer, name)
        assert isinstance(raw, keras.Variable) and raw is layer.kernel
    # DepthwiseConv2D's kernel is a plain attribute: its Adapter says raw=None.
    assert not isinstance(inspect.getattr_static(keras.layers.DepthwiseConv2D, "kernel", None),
                          property)


@check("keras3", "attention_projections")
def _(attention_projections):
    layer = keras.layers.MultiHeadAttention(2, 4)
    layer(keras.ops.zeros((1, 3, 8)), keras.ops.zeros((1, 3, 8)))  # builds the projections
    inside = attention_projections(layer)
    assert [type(s) for s in inside] == [keras.layers.EinsumDense] * 4
    assert [s.name for s in inside] == ["query", "key", "value", "attention_output"]
    assert {id(v) for s in inside for v in s.weights} == {id(v) for v in layer.weights}


@check("keras3", "attention_parts")
def _(attention_parts):
    ops = keras.ops
    layer = keras.layers.MultiHeadAttention(2, 4)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    want = layer(x, x)
    parts = attention_parts(layer)
    q, k, v, o = k3.attention_projections(layer)
    scores = ops.einsum(parts["scores_equation"], k(x), q(x) * parts["scale"])
    probs = parts["masked_softmax"](scores, None)
    got = o(ops.einsum(parts["combine_equation"], parts["dropout_layer"](probs), v(x)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert parts["dropout"] == 0.0 and parts["gated"] is False
    assert parts["sliding_window"] is None


@check("keras3", "attention_method")
def _(attention_method):
    seen = []
    stock = getattr(keras.layers.MultiHeadAttention, attention_method())

    def spy(self, *args, **kwargs):
        seen.append(len(args))
        return stock(self, *args, **kwargs)
    layer = type("Spy", (keras.layers.MultiHeadAttention,), {attention_method(): spy})(2, 4)
    out = layer(np.zeros((1, 3, 8), "float32"), np.zeros((1, 3, 8), "float32"))
    assert seen and tuple(out.shape) == (1, 3, 8)


@check("keras3", "raw_embeddings_attribute")
def _(raw_embeddings_attribute):
    layer = keras.layers.Embedding(5, 3)
    assert isinstance(inspect.getattr_static(type(layer), "embeddings"), property)
    layer.build((None, 2))
    raw = getattr(layer, raw_embeddings_attribute())
    assert isinstance(raw, keras.Variable) and raw is layer.embeddings


@check("keras3", "call_context")
def _(call_context):
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):  # takes no `training`, as a compressible layer's stock call may not
            seen.append(call_context(self).training)
            return x
    probe = Probe()
    probe(np.zeros((1, 2), "float32"), training=True)
    probe(np.zeros((1, 2), "float32"), training=False)
    assert seen == [True, False]


@check("keras3", "tracker")
def _(tracker):
    layer = keras.layers.Dense(2)
    layer.build((None, 4))
    t = tracker(layer)
    assert t.locked
    with pytest.raises(ValueError):
        layer.extra = keras.Variable(np.zeros(3))
    t.unlock()
    assert not t.locked
    layer.extra = layer.add_weight(name="extra", shape=(3,), initializer="zeros")
    t.lock()
    assert t.locked and any(v is layer.extra for v in layer.weights)


@check("keras3", "untrack_variable")
def _(untrack_variable):
    layer = keras.layers.Dense(2)
    layer.build((None, 4))
    k3.tracker(layer).unlock()
    extra = layer.add_weight(name="extra", shape=(3,), initializer="zeros")
    k3.tracker(layer).lock()
    assert any(v is extra for v in layer.weights)
    untrack_variable(layer, extra)
    assert not any(v is extra for v in layer.weights) and len(layer.weights) == 2


@check("keras3", "loss_tracker")
def _(loss_tracker):
    model = _k3_graph()
    model.compile(optimizer="sgd", loss="mse")
    logs = model.train_on_batch(np.ones((4, 4), "float32"), np.zeros((4, 2), "float32"),
                                return_dict=True)
    tracker = loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean)
    assert float(tracker.result()) == pytest.approx(logs["loss"])


@check("keras3", "sequential_functional")
def _(sequential_functional):
    dense = keras.layers.Dense(2, name="d")
    seq = keras.Sequential([keras.Input((4,)), dense])
    graph = sequential_functional(seq)
    assert isinstance(graph, k3.functional_class())
    assert k3.keras_history(graph.outputs[0]).operation is dense
    assert sequential_functional(_k3_graph()) is None


@check("keras3", "nodes_by_depth")
def _(nodes_by_depth):
    model = _k3_graph()
    nodes = [n for depth in nodes_by_depth(model).values() for n in depth]
    by_op = {n.operation.name: n for n in nodes}
    assert {"x", "h", "out"} <= set(by_op)
    (arg,) = by_op["out"].arguments.keras_tensors
    assert k3.keras_history(arg).operation is model.get_layer("h")


@check("keras3", "keras_history")
def _(keras_history):
    model = _k3_graph()
    history = keras_history(model.outputs[0])
    assert history.operation is model.get_layer("out") and history.node_index == 0


@check("keras3", "compile_config")
def _(compile_config):
    model = _k3_graph()
    assert compile_config(model) is None
    model.compile(optimizer="sgd", loss="mse", loss_weights=[0.5], metrics=["mae"])
    config = compile_config(model).config
    assert config["loss"] == "mse" and config["loss_weights"] == [0.5]
    assert config["metrics"] == ["mae"]


@check("keras3", "optimizer_learning_rate")
def _(optimizer_learning_rate):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert optimizer_learning_rate(keras.optimizers.Adam(schedule)) is schedule
    rate = optimizer_learning_rate(keras.optimizers.Adam(0.01))
    assert float(keras.ops.convert_to_numpy(rate)) == pytest.approx(0.01)


@check("keras3", "omit_frequent_tracing_warning")
def _(omit_frequent_tracing_warning):
    fn = tf.function(lambda: tf.constant(1))
    attr = "_omit_frequent_tracing_warning"
    assert getattr(fn, attr) is False  # TensorFlow's own default: the switch still exists
    # ... and TensorFlow still reads it where it warns of retracing.
    assert attr in inspect.getsource(inspect.getmodule(type(fn)))
    omit_frequent_tracing_warning(fn)
    assert getattr(fn, attr) is True and int(fn()) == 1


# --------------------------------------------------------------------------- tf_keras / tfmot

def _tfk_graph():
    """x -> Dense h -> ReLU r -> Dense out, and x -> BatchNormalization(training=False) -> bn."""
    tf_keras.utils.set_random_seed(0)
    x = tf_keras.Input((4,), name="x")
    h = tf_keras.layers.Dense(3, name="h")(x)
    r = tf_keras.layers.ReLU(name="r")(h)
    out = tf_keras.layers.Dense(2, name="out")(r)
    bn = tf_keras.layers.BatchNormalization(name="bn")(x, training=False)
    return tf_keras.Model(x, [out, bn], name="g")


def _tfk_dense(kernel=None):
    model = tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(4, name="d")])
    if kernel is not None:
        model.layers[0].kernel.assign(kernel)
    return model


def _custom_weighted_layer():
    class Custom(tf_keras.layers.Layer):  # a weight tfmot's registries know nothing of
        def build(self, input_shape):
            self.w = self.add_weight("w", (2,))
    layer = Custom()
    layer.build((None, 2))
    return layer


def _qat(model, scheme=None):
    q = tfmot.quantization.keras
    return q.quantize_apply(q.quantize_annotate_model(model), *([scheme] if scheme else []))


# Three distinct values per tensor, a third of them zero: clustered and pruned.
_PCQAT_KERNEL = np.tile(np.array([0.0, 0.0, 1.0, 2.0], "float32"), (8, 1))


@check("tfmot", "serialization_lib")
def _(serialization_lib):
    config = tf_keras.layers.serialize(tf_keras.layers.Lambda(lambda v: v * 2))
    with pytest.raises(ValueError, match="Lambda"):
        tf_keras.layers.deserialize(config)  # safe mode refuses a lambda's code
    with serialization_lib.SafeModeScope(safe_mode=False):
        assert not serialization_lib.in_safe_mode()
        assert isinstance(tf_keras.layers.deserialize(config), tf_keras.layers.Lambda)
    assert serialization_lib.in_safe_mode() is not False


@check("tfmot", "cluster_wrapper")
def _(cluster_wrapper):
    c = tfmot.clustering.keras
    model = c.cluster_weights(_tfk_dense(), number_of_clusters=2,
                              cluster_centroids_init=c.CentroidInitialization.LINEAR)
    layer = model.layers[0]
    assert isinstance(layer, cluster_wrapper.ClusterWeights)
    # What read.kernels and wrap.strip read of it.
    assert list(layer.original_clusterable_weights) == ["kernel"]
    layer.update_clustered_weights_associations()
    assert np.unique(np.asarray(layer.get_weight_from_layer("kernel"))).size <= 2


@check("tfmot", "clustering_registry")
def _(clustering_registry):
    registry = clustering_registry.ClusteringRegistry
    assert registry.supports(tf_keras.layers.Conv2D(2, 3))
    assert not registry.supports(_custom_weighted_layer())


@check("tfmot", "quantize_wrapper")
def _(quantize_wrapper):
    qat = _qat(_tfk_dense())
    assert isinstance(qat.layers[1], quantize_wrapper.QuantizeWrapper)
    assert isinstance(qat.layers[1].layer, tf_keras.layers.Dense)


@check("tfmot", "quantize_layer")
def _(quantize_layer):
    qat = _qat(_tfk_dense())
    assert isinstance(qat.layers[0], quantize_layer.QuantizeLayer)


@check("tfmot", "cpq")
def _(cpq, monkeypatch):
    calls = []
    original = cpq.get_centroids

    def spy(*args, **kwargs):  # quantize.py patches it the same way, by module attribute
        calls.append(args[0].name)
        return original(*args, **kwargs)
    monkeypatch.setattr(cpq, "get_centroids", spy)
    qat = _qat(_tfk_dense(_PCQAT_KERNEL),
               tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(True))
    assert calls
    ((w, quantizer, qvars),) = tm.weight_vars(qat.layers[1])
    assert isinstance(quantizer, cpq.ClusterPreserveDefaultWeightsQuantizer)
    assert quantizer.preserve_sparsity
    assert tuple(qvars[cpq.CLUSTER_CENTROIDS].shape) == (3,)
    assert np.array_equal(np.asarray(qvars[cpq.SPARSITY_MASK]), (_PCQAT_KERNEL != 0))


@check("tfmot", "ppq")
def _(ppq):
    qat = _qat(_tfk_dense(_PCQAT_KERNEL),
               tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())
    ((w, quantizer, qvars),) = tm.weight_vars(qat.layers[1])
    assert isinstance(quantizer, ppq.PrunePreserveDefaultWeightsQuantizer)
    assert np.array_equal(np.asarray(qvars["sparsity_mask"]), (_PCQAT_KERNEL != 0))


@check("tfmot", "prune_registry")
def _(prune_registry):
    registry = prune_registry.PruneRegistry
    assert registry.supports(tf_keras.layers.Dense(2))
    assert not registry.supports(_custom_weighted_layer())


@check("tfmot", "pruning_wrapper")
def _(pruning_wrapper):
    s = tfmot.sparsity.keras
    model = s.prune_low_magnitude(_tfk_dense(), pruning_schedule=s.ConstantSparsity(0.5, 0))
    layer = model.layers[0]
    assert isinstance(layer, pruning_wrapper.PruneLowMagnitude)
    ((w, mask, _),) = layer.pruning_vars  # what read.kernels and wrap.strip read
    assert tuple(w.shape) == tuple(mask.shape) == (8, 4)


@check("tfmot", "is_graph_network")
def _(is_graph_network):
    class Sub(tf_keras.Model):
        def call(self, x):
            return x
    assert is_graph_network(_tfk_graph()) is True
    assert is_graph_network(Sub()) is False
    assert is_graph_network(object()) is False


@check("tfmot", "output_layers")
def _(output_layers):
    model = _tfk_graph()
    assert output_layers(model) == [model.get_layer("out"), model.get_layer("bn")]


@check("tfmot", "weight_vars")
def _(weight_vars):
    qat = _qat(_tfk_dense())
    ((w, quantizer, qvars),) = weight_vars(qat.layers[1])
    assert w.name.split("/")[-1] == "kernel:0" and isinstance(qvars, dict)
    fake_quant = np.asarray(quantizer(w, False, weights=qvars))  # as read.kernels calls it
    assert fake_quant.shape == (8, 4)
    assert weight_vars(qat.layers[0]) == [] and weight_vars(tf_keras.layers.Dense(2)) == []


@check("tfmot", "own_trainable_weights")
def _(own_trainable_weights):
    layer = tf_keras.layers.Dense(2)
    layer.build((None, 4))
    own = own_trainable_weights(layer)
    assert [v.name.split("/")[-1] for v in own] == ["kernel:0", "bias:0"]
    own[:] = [layer.kernel]  # the live list: what the layer trains follows it
    assert [v is layer.kernel for v in layer.trainable_weights] == [True]


@check("tfmot", "own_non_trainable_weights")
def _(own_non_trainable_weights):
    layer = tf_keras.layers.Dense(2)
    layer.build((None, 4))
    own_trainable = tm.own_trainable_weights(layer)
    own_trainable[:] = [v for v in own_trainable if v is not layer.bias]
    own_non_trainable_weights(layer).append(layer.bias)
    assert any(v is layer.bias for v in layer.non_trainable_weights)
    assert not any(v is layer.bias for v in layer.trainable_weights)


@check("tfmot", "registry_weight_names")
def _(registry_weight_names):
    prune = tm.prune_registry.PruneRegistry
    cluster = tm.clustering_registry.ClusteringRegistry
    dense, conv = tf_keras.layers.Dense(2), tf_keras.layers.Conv2D(2, 3)
    dense.build((None, 4))
    conv.build((None, 5, 5, 1))
    assert list(registry_weight_names(prune, dense)) == ["kernel"]
    assert list(registry_weight_names(cluster, conv)) == ["kernel"]
    lstm = tf_keras.layers.LSTM(2)
    lstm.build((None, 3, 4))
    assert prune.supports(lstm)
    with pytest.raises(KeyError):  # layers.py falls back to the kernels for these
        registry_weight_names(prune, lstm)


@check("tfmot", "outbound_nodes")
def _(outbound_nodes):
    model = _tfk_graph()
    nodes = outbound_nodes(model.get_layer("h"))
    assert [n.outbound_layer for n in nodes] == [model.get_layer("r")]


@check("tfmot", "inbound_nodes")
def _(inbound_nodes):
    shared = tf_keras.layers.Dense(2)
    x = tf_keras.Input((4,))
    tf_keras.Model(x, [shared(x), shared(x)])
    assert len(inbound_nodes(shared)) == 2
    assert len(inbound_nodes(_tfk_graph().get_layer("h"))) == 1


@check("tfmot", "flatten_to_reference_inputs")
def _(flatten_to_reference_inputs):
    a, b = tf_keras.Input((2,), name="a"), tf_keras.Input((3,), name="b")
    model = tf_keras.Model({"a": a, "b": b},
                           tf_keras.layers.Concatenate()([a, b]))
    assert [t.name for t in model.inputs] == ["a", "b"]
    va, vb = tf.zeros((1, 2)), tf.ones((1, 3))
    flat = flatten_to_reference_inputs(model, {"b": vb, "a": va})
    assert [id(t) for t in flat] == [id(va), id(vb)]  # in model.inputs order


@check("tfmot", "expects_training_arg")
def _(expects_training_arg):
    assert expects_training_arg(tf_keras.layers.BatchNormalization()) is True
    assert expects_training_arg(tf_keras.layers.Dense(2)) is False
    assert expects_training_arg(object()) is False


@check("tfmot", "nodes_by_depth")
def _(nodes_by_depth):
    model = _tfk_graph()
    nodes = [n for depth in nodes_by_depth(model).values() for n in depth]
    by_layer = {n.layer.name: n for n in nodes}
    assert {"x", "h", "r", "out", "bn"} <= set(by_layer) and by_layer["x"].is_input
    assert by_layer["bn"].call_kwargs["training"] is False  # flatten._training_args
    node = by_layer["r"]  # what flatten._replay reads of a node
    (in_id,) = node.flat_input_ids
    args, kwargs = node.map_arguments({in_id: [tf.zeros((1, 3))]})
    assert tuple(args[0].shape) == (1, 3) and len(node.flat_output_ids) == 1
    assert nodes_by_depth(object(), {}) == {}
    with pytest.raises(AttributeError):
        nodes_by_depth(object())


@check("tfmot", "tensor_usage_count")
def _(tensor_usage_count):
    model = _tfk_graph()
    counts = tensor_usage_count(model)
    assert counts[str(id(model.inputs[0]))] == 2  # read by h and bn
    assert all(counts[str(id(t))] == 1 for t in model.outputs)


@check("tfmot", "nested_inputs")
def _(nested_inputs):
    a, b = tf_keras.Input((2,), name="a"), tf_keras.Input((3,), name="b")
    model = tf_keras.Model({"a": a, "b": b}, tf_keras.layers.Concatenate()([a, b]))
    assert sorted(nested_inputs(model)) == ["a", "b"] and nested_inputs(model)["a"] is a
    assert nested_inputs(object()) is None


@check("tfmot", "nested_outputs")
def _(nested_outputs):
    x = tf_keras.Input((2,))
    p, q = tf_keras.layers.Dense(1, name="p")(x), tf_keras.layers.Dense(1, name="q")(x)
    model = tf_keras.Model(x, {"p": p, "q": q})
    assert sorted(nested_outputs(model)) == ["p", "q"] and nested_outputs(model)["q"] is q
    assert nested_outputs(object()) is None


@check("tfmot", "optimizer_learning_rate")
def _(optimizer_learning_rate):
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert optimizer_learning_rate(tf_keras.optimizers.Adam(schedule)) is schedule
    assert float(optimizer_learning_rate(tf_keras.optimizers.Adam(0.01))) == pytest.approx(0.01)
    # A legacy optimizer has none: models.py then asks legacy_learning_rate.
    assert optimizer_learning_rate(tf_keras.optimizers.legacy.Adam(schedule)) is None


@check("tfmot", "legacy_learning_rate")
def _(legacy_learning_rate):
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert legacy_learning_rate(tf_keras.optimizers.legacy.Adam(schedule)) is schedule
    assert float(legacy_learning_rate(tf_keras.optimizers.legacy.SGD(0.01))) == pytest.approx(0.01)
    assert legacy_learning_rate(tf_keras.optimizers.Adam(0.01)) is None


def _tfk_compiled(**kwargs):
    model = _tfk_dense()
    model.compile(optimizer="sgd", loss="mse", **kwargs)
    return model


@check("tfmot", "user_loss_weights")
def _(user_loss_weights):
    assert user_loss_weights(_tfk_compiled(loss_weights=[0.5]).compiled_loss) == [0.5]
    assert user_loss_weights(_tfk_compiled().compiled_loss) is None


@check("tfmot", "user_metrics")
def _(user_metrics):
    assert user_metrics(_tfk_compiled(metrics=["mae"]).compiled_metrics) == ["mae"]


@check("tfmot", "user_weighted_metrics")
def _(user_weighted_metrics):
    model = _tfk_compiled(weighted_metrics=["mse"])
    assert user_weighted_metrics(model.compiled_metrics) == ["mse"]


@check("tfmot", "run_eagerly_setting")
def _(run_eagerly_setting):
    assert run_eagerly_setting(_tfk_compiled(run_eagerly=True)) is True
    model = _tfk_compiled()
    assert run_eagerly_setting(model) is None and model.run_eagerly is False


@check("tfmot", "jit_compile_setting")
def _(jit_compile_setting):
    assert jit_compile_setting(_tfk_compiled(jit_compile=False)) is False
    assert jit_compile_setting(_tfk_compiled()) is None


@check("tfmot", "steps_per_execution")
def _(steps_per_execution):
    assert int(steps_per_execution(_tfk_compiled(steps_per_execution=3)).numpy()) == 3
    assert steps_per_execution(_tfk_dense()) is None


# --------------------------------------------------------------------------- TF Lite / LiteRT

_KERNEL = np.arange(12, dtype="float32").reshape(4, 3)


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    """x @ a constant (4, 3) kernel, converted: one FULLY_CONNECTED op."""
    kernel = tf.constant(_KERNEL)

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def f(x):
        return tf.matmul(x, kernel)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    path = tmp_path_factory.mktemp("tflite") / "tiny.tflite"
    path.write_bytes(converter.convert())
    return path


@check("tf", "tflite_schema")
def _(tflite_schema):
    schema = tflite_schema()
    assert schema.BuiltinOperator.FULLY_CONNECTED == 9
    assert schema.TensorType.FLOAT32 == 0 and schema.TensorType.INT8 == 9


@check("tf", "flatbuffer_utils")
def _(flatbuffer_utils, tiny_tflite):
    model = flatbuffer_utils().read_model(os.fspath(tiny_tflite))
    names = {v: k for k, v in vars(_tf_compat.tflite_schema().BuiltinOperator).items()
             if not k.startswith("_")}
    codes = model.operatorCodes
    ops = [names[max(codes[op.opcodeIndex].builtinCode,
                     codes[op.opcodeIndex].deprecatedBuiltinCode)]
           for op in model.subgraphs[0].operators]  # as export.operators reads them
    assert ops == ["FULLY_CONNECTED"]
    # export reads the stored weights from the same objects: the kernel as stored, (out, in)
    (stored,) = export.read_weights(tiny_tflite).values()
    assert np.array_equal(stored, _KERNEL.T)
