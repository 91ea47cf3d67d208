"""CompressionMetrics and InvariantGuard: in collaborative_fit and as drop-ins in model.fit."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt import Cluster, Prune, Quantize, Train
from keras_colopt.callbacks import CompressionMetrics, InvariantGuard

from conftest import compile_, tiny_sequential


def read_events(folder):
    """{step: {tag: value or histogram}} from every event file under `folder`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = tf.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value
                out.setdefault(event.step, {})[v.tag] = value
    return out


def test_tensorboard_tags_per_epoch(digits, tmp_path):
    (x, y), (xt, yt) = digits
    log_dir = tmp_path / "run1"
    colopt.collaborative_fit(
        tiny_sequential(), x, y, phases=[Train(epochs=1), Prune(sparsity=0.5, epochs=2),
                                         Cluster(clusters=4, epochs=1, per_channel=True),
                                         Quantize(epochs=1)],
        validation_data=(xt, yt), batch_size=64, log_dir=log_dir, verbose=0)
    events = read_events(log_dir / "compression")
    assert sorted(events) == [0, 1, 2, 3, 4]  # every epoch once, on one axis
    layers = ["conv", "hidden", "logits"]
    base = {f"{kind}/{l}" for kind in ("sparsity", "unique_weights", "weights") for l in layers}
    for step in (0, 1, 2):
        assert set(events[step]) == base
    # Per-channel counts appear once the conv is clustered per channel.
    assert set(events[3]) == base | {"unique_weights_per_channel/conv"}
    assert set(events[4]) == base | {"unique_weights_per_channel/conv"}
    assert float(events[0]["sparsity/hidden"]) == 0.0
    assert float(events[2]["sparsity/hidden"]) >= 0.49  # pruning schedule ended
    assert float(events[3]["unique_weights/hidden"]) <= 4
    assert float(events[4]["unique_weights_per_channel/conv"]) <= 4
    # Keras' own TensorBoard scalars share the axis and carry our aggregates.
    train = read_events(log_dir / "train")
    assert sorted(train) == [0, 1, 2, 3, 4]
    assert {"epoch_loss", "epoch_compression/sparsity"} <= set(train[4])
    val = read_events(log_dir / "validation")
    assert {step for step, tags in val.items() if "epoch_loss" in tags} == {0, 1, 2, 3, 4}


def test_drop_in_with_a_hand_built_tfmot_model(digits, tmp_path):
    (x, y), _ = digits
    base = tiny_sequential()
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        base, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0,
                                                                     frequency=1))
    compile_(pruned)
    metrics = CompressionMetrics(log_dir=tmp_path / "logs")
    guard = InvariantGuard(sparsity=0.5)
    h = pruned.fit(x, y, batch_size=64, epochs=2, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), metrics, guard])
    assert h.history["compression/sparsity"][-1] >= 0.49
    assert h.history["invariants/violations"] == [0, 0]
    assert set(metrics.layer_stats) == {"conv", "hidden", "logits"}
    assert all(s.sparsity >= 0.49 for s in metrics.layer_stats.values())
    # One instance serves a second fit (re-entrant): a new event file, same tags.
    pruned.fit(x, y, batch_size=64, epochs=3, initial_epoch=2, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), metrics, guard])
    assert sorted(read_events(tmp_path / "logs" / "compression")) == [0, 1, 2]


def test_drop_in_on_an_unwrapped_model(digits):
    (x, y), _ = digits
    model = tiny_sequential()
    metrics = CompressionMetrics()
    h = model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[metrics])
    assert h.history["compression/sparsity"] == [0.0]
    # Dense 'hidden' holds 288*16 = 4608 float weights, nearly all distinct.
    assert metrics.layer_stats["hidden"].unique > 4000
    assert metrics.layer_stats["hidden"].size == 288 * 16


class Tamper(keras.callbacks.Callback):
    """Breaks a pruned layer's mask at the end of epoch `at`: the kernel densifies."""

    def __init__(self, layer, at):
        super().__init__()
        self.layer, self.at = layer, at

    def on_epoch_end(self, epoch, logs=None):
        if epoch != self.at:
            return
        wrapper = [l for l in self.model.layers if getattr(l, "layer", l).name == self.layer][0]
        for weight, mask, _ in wrapper.pruning_vars:
            mask.assign(tf.ones_like(mask))
            weight.assign(tf.random.normal(weight.shape) + 0.1)


def test_guard_raises_on_a_tampered_kernel(digits):
    (x, y), _ = digits
    pruned = compile_(tfmot.sparsity.keras.prune_low_magnitude(
        tiny_sequential(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
            0.5, begin_step=0, frequency=1)))
    with pytest.raises(colopt.InvariantViolation) as info:
        pruned.fit(x, y, batch_size=64, epochs=3, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Tamper("hidden", at=1),
                              InvariantGuard()])  # expectations read from the wrappers
    (v,) = info.value.violations
    assert (v.layer, v.invariant, v.epoch, v.phase) == ("hidden", "sparsity", 1, "prune")
    assert v.expected == ">= 0.5000" and v.found.startswith("0.0000")
    msg = str(info.value)
    assert "layer 'hidden', phase prune, epoch 1: sparsity expected >= 0.5000" in msg


def test_guard_warn_mode_and_explicit_clusters(digits):
    (x, y), _ = digits
    model = tiny_sequential()
    guard = InvariantGuard(clusters={"hidden": 8}, mode="warn")
    with pytest.warns(RuntimeWarning, match="unique values per tensor"):
        h = model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[guard])
    assert h.history["invariants/violations"] == [1]
    assert guard.violations[0].layer == "hidden" and guard.violations[0].invariant == "clusters"


def test_guard_checks_clusters_per_channel_when_asked():
    from keras_colopt import invariants

    # 2 output channels, each with 2 values, 4 values in the tensor.
    k = np.array([[1.0, 3.0], [2.0, 4.0], [1.0, 3.0]])
    e_tensor = invariants.Expectation(clusters=2)
    e_channel = invariants.Expectation(clusters=2, per_channel=True)
    assert invariants.check_layer("d", [("kernel", k, -1)], e_channel) == []
    (v,) = invariants.check_layer("d", [("kernel", k, -1)], e_tensor)
    assert v.found.startswith("4")
    (v,) = invariants.check_layer("d", [("kernel", k, -1)],
                                  invariants.Expectation(clusters=1, per_channel=True))
    assert v.found == "2 in channel 0 of kernel"  # the channel with the most values


def test_guard_after_metrics_uses_their_kernels_of_the_same_fit_only(digits):
    # collaborative_fit puts the guard right after CompressionMetrics and lets it take the
    # kernels they read at the same epoch end. A tampered kernel is still caught through
    # them, and a guard in a later fit does not take an earlier fit's kernels for its own.
    (x, y), _ = digits
    pruned = compile_(tfmot.sparsity.keras.prune_low_magnitude(
        tiny_sequential(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
            0.5, begin_step=0, frequency=1)))
    metrics = CompressionMetrics()

    def guard():
        g = InvariantGuard()
        g._kernels_from = metrics
        return g
    with pytest.raises(colopt.InvariantViolation) as info:
        pruned.fit(x, y, batch_size=64, epochs=3, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Tamper("hidden", at=1),
                              metrics, guard()])
    assert [(v.layer, v.epoch) for v in info.value.violations] == [("hidden", 1)]
    assert metrics.layer_stats["hidden"].sparsity < 0.5  # the guard saw what they saw

    pruned = compile_(tfmot.sparsity.keras.prune_low_magnitude(
        tiny_sequential(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
            0.5, begin_step=0, frequency=1)))
    pruned.fit(x, y, batch_size=64, epochs=2, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), metrics, guard()])
    with pytest.raises(colopt.InvariantViolation) as info:  # the metrics are not in this fit
        pruned.fit(x, y, batch_size=64, epochs=2, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Tamper("hidden", at=1),
                              guard()])
    assert [(v.layer, v.epoch) for v in info.value.violations] == [("hidden", 1)]


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.2}, "sparsity=1.2"),
    ({"clusters": 2.5}, "clusters=2.5"),
    ({"clusters": {"dense": 0}}, "clusters={'dense': 0}"),
    ({"mode": "stop"}, "mode='stop'"),
    ({"tolerance": -1}, "tolerance=-1"),
])
def test_guard_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("{", r"\{")):
        InvariantGuard(**kwargs)


def test_guard_unknown_layer_is_refused_before_training(digits):
    (x, y), _ = digits
    model = tiny_sequential()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"names layer\(s\) \['nope'\]"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[InvariantGuard(sparsity={"nope": 0.5})])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_callback_configs_round_trip():
    for cb in (CompressionMetrics(log_dir="logs", histograms=False),
               InvariantGuard(sparsity={"a": 0.5}, clusters=8, mode="warn", tolerance=0.01,
                              per_channel=True, phase="PCQAT")):
        again = type(cb)(**cb.get_config())
        assert again.get_config() == cb.get_config()


def _prune_dense_only(model):
    """tfmot's "prune only the Dense layers" tutorial flow: clone_model with a
    clone_function that wraps Dense layers and leaves the conv as it is."""
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)

    def wrap(layer):
        if isinstance(layer, keras.layers.Dense):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer
    return compile_(keras.models.clone_model(model, clone_function=wrap))


def test_scalar_guard_checks_only_the_layers_that_carry_pruning(digits):
    """The README's drop-in guard in a flow that prunes the Dense layers only: the unwrapped
    conv (0 % zeros) is not a violation; a broken Dense mask still is."""
    (x, y), _ = digits
    pruned = _prune_dense_only(tiny_sequential())
    guard = InvariantGuard(sparsity=0.5)
    h = pruned.fit(x, y, batch_size=64, epochs=1, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), guard])
    assert h.history["invariants/violations"] == [0]
    assert sorted(guard.expectations()) == ["hidden", "logits"]
    with pytest.raises(colopt.InvariantViolation) as info:
        pruned.fit(x, y, batch_size=64, epochs=3, initial_epoch=1, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Tamper("hidden", at=2),
                              guard])
    assert [v.layer for v in info.value.violations] == ["hidden"]


def test_scalar_guard_on_a_model_carrying_no_such_technique_warns(digits):
    (x, y), _ = digits
    pruned = _prune_dense_only(tiny_sequential())
    with pytest.warns(RuntimeWarning, match=r"InvariantGuard\(clusters=8\): no layer .* carries "
                                            r"clustering.*clusters=\{'layer_name': 8\}"):
        pruned.fit(x, y, batch_size=64, epochs=1, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(),
                              InvariantGuard(sparsity=0.5, clusters=8)])
