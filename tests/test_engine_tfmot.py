"""The tfmot engine: schedules, effective kernels, expectations, per-channel kmeans++ guard."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from keras_colopt import Cluster, Prune, resolve, stats
from keras_colopt.engines import tfmot as engine
from keras_colopt.engines.tfmot import wrap

from conftest import compile_, tiny_sequential


@pytest.mark.parametrize("epochs,steps", [(1, 1), (1, 7), (2, 8), (3, 23), (5, 100)])
def test_polynomial_schedule_reaches_its_target_on_a_mask_update(epochs, steps):
    phase = Prune(sparsity=0.6, epochs=epochs, initial_sparsity=0.1)
    schedule, end = engine.pruning_schedule(phase, steps)
    ramp = max(1, epochs - 1) * steps
    assert 0 < end <= ramp
    # Boundaries: the schedule's own value at its first and last mask update.
    should0, s0 = schedule(tf.constant(0, tf.int64))
    should_end, s_end = schedule(tf.constant(end, tf.int64))
    assert bool(should0) and float(s0) == pytest.approx(0.1)
    assert bool(should_end) and float(s_end) == pytest.approx(0.6)
    # After the end it no longer changes the mask.
    should_after, _ = schedule(tf.constant(end + 1, tf.int64))
    assert not bool(should_after)


def test_constant_schedule_for_m_by_n():
    schedule, first = engine.pruning_schedule(Prune(sparsity=0.5, epochs=2, m_by_n=(2, 4)), 10)
    assert isinstance(schedule, tfmot.sparsity.keras.ConstantSparsity)
    assert bool(schedule(tf.constant(first, tf.int64))[0])


def _wrapped(model, name):
    return [l for l in model.layers if engine.base_name(l) == name][0]


def test_cluster_kernel_is_what_the_layer_computes(digits):
    (x, y), _ = digits
    model = tiny_sequential()
    plan = resolve([Cluster(clusters=4, epochs=1)])
    clustered, _, touched = engine.apply_phase(engine.clone_model(model), plan.phases[0], 8)
    compile_(clustered)
    clustered.fit(x, y, batch_size=64, epochs=1, verbose=0)
    logits = _wrapped(clustered, "logits")
    (name, k, axis), = engine.kernels(logits)
    raw = logits.original_clusterable_weights["kernel"].numpy()
    assert np.unique(k).size <= 4 < np.unique(raw).size  # the raw variable is not what runs
    h = np.random.default_rng(0).normal(size=(5, 16)).astype("float32")
    np.testing.assert_allclose(logits(h).numpy(), h @ k + logits.layer.bias.numpy(),
                               rtol=1e-5, atol=1e-5)


def _conv_bn(seed=0):
    """Conv2D(use_bias=False) -> BatchNormalization (MobileNetV2's momentum) -> ReLU -> Dense."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inp)
    h = keras.layers.BatchNormalization(momentum=0.999, name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    out = keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flat")(h))
    return compile_(keras.Model(inp, out, name="conv_bn"))


def test_cluster_phase_trains_batchnorm_on_its_moving_statistics(digits):
    """tfmot's cluster_weights(model) wraps every layer, BatchNormalization included, and its
    wrapper calls the layer without `training`: in the hand-written pipeline a BN layer
    normalizes with its moving statistics during clustering, so the phase trains what the
    model computes at inference. A Cluster phase that left BN in training mode trained on
    batch statistics that its moving statistics (momentum 0.999) could not follow: a pruned
    MobileNetV2 ended 0.80 accurate on its training inputs in training mode, 0.36 in
    inference mode (hand-written tfmot: 0.75)."""
    (x, y), _ = digits
    model = compile_(engine.clone_model(_conv_bn()))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    plan = resolve([Prune(sparsity=0.5, epochs=1), Cluster(clusters=4, epochs=1)])
    pruned, companions, _ = engine.apply_phase(model, plan.phases[0], 8)
    compile_(pruned).fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=companions)
    pruned = engine.strip(pruned)
    hand = engine.clone_model(pruned)  # wrapping a layer for clustering changes that layer
    clustered, _, touched = engine.apply_phase(pruned, plan.phases[1], 8)
    assert sorted(touched) == ["conv", "logits"]
    bn = engine.base_layer(_wrapped(clustered, "bn"))
    stats_before = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    compile_(clustered, lr=1e-3).fit(x, y, batch_size=64, epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), stats_before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), stats_before[1])
    batch = x[:64]
    trained_on = clustered(batch, training=True).numpy()
    np.testing.assert_allclose(trained_on, clustered(batch, training=False).numpy(),
                               rtol=1e-5, atol=1e-5)
    # What it computes at inference is what its stripped copy computes (no stale kernel).
    np.testing.assert_allclose(engine.strip(clustered).predict(x, verbose=0),
                               clustered.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    # As the hand-written pipeline does.
    by_hand = tfmot.clustering.keras.cluster_weights(
        hand, number_of_clusters=4, preserve_sparsity=True)
    np.testing.assert_allclose(by_hand(batch, training=True).numpy(),
                               by_hand(batch, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_pruned_kernel_is_weight_times_mask():
    model = tiny_sequential()
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model)
    hidden = _wrapped(pruned, "hidden")
    weight, mask, _ = hidden.pruning_vars[0]
    m = np.zeros(mask.shape, "float32")
    m[::2] = 1
    mask.assign(m)
    (_, k, _), = engine.kernels(hidden)
    np.testing.assert_array_equal(k, weight.numpy() * m)


def test_expectations_skip_layers_without_weights():
    pruned = tfmot.sparsity.keras.prune_low_magnitude(tiny_sequential())
    assert set(engine.expectations(pruned)) == {"conv", "hidden", "logits"}


def test_kmeans_short_channels_are_detected():
    conv = keras.layers.Conv2D(3, 2)
    conv.build((None, 4, 4, 1))
    k = np.ones((2, 2, 1, 3), "float32") * np.arange(1, 5, dtype="float32").reshape(2, 2, 1, 1)
    k[..., 1] = 0
    k[0, 0, 0, 1] = 5.0  # channel 1: a single non-zero weight
    conv.kernel.assign(k)
    phase = Cluster(clusters=3, epochs=1, per_channel=True)
    assert wrap._kmeans_short_channels(conv, phase, preserve_sparsity=True) == [1]
    assert wrap._kmeans_short_channels(
        conv, Cluster(clusters=3, epochs=1, per_channel=True, init="linear"), True) == []


def test_per_channel_clustering_of_a_sparse_conv_falls_back_to_linear(digits, caplog):
    """tfmot's per-channel kmeans++ crashes on a channel with fewer non-zero weights than
    clusters; the engine detects that layer, says so, and initializes it linearly."""
    model = engine.clone_model(tiny_sequential())
    conv = model.get_layer("conv")
    k = conv.kernel.numpy()
    k[..., 0] = 0
    k[0, 0, 0, 0] = 0.3
    conv.kernel.assign(k)
    plan = resolve([Prune(sparsity=0.5, epochs=1), Cluster(clusters=4, epochs=1,
                                                          per_channel=True)])
    with caplog.at_level(logging.WARNING, logger="keras_colopt"):
        clustered, _, _ = engine.apply_phase(model, plan.phases[1], 8)
    assert any("'conv'" in r.getMessage() and "linear" in r.getMessage() for r in caplog.records)
    (_, k, _), = engine.kernels(_wrapped(clustered, "conv"))
    assert stats.unique_values(k, axis=-1).max() <= 4


_TF_KERAS_PROBE = """
import os, sys
import numpy as np
import tensorflow as tf
import keras_colopt as colopt
import tf_keras
from keras_colopt.engines import tfmot  # noqa: F401  (imports tfmot)
m = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(3,), name="d"),
                         tf_keras.layers.Dense(2, name="o")])
m.compile("adam", "mse")
colopt.collaborative_fit(m, np.ones((8, 3)), np.ones((8, 2)), verbose=0,
                         phases=[colopt.Prune(sparsity=0.5, epochs=1)])
print(tf.keras.Model.__module__, os.environ.get("TF_USE_LEGACY_KERAS"))
"""


@pytest.mark.parametrize("legacy", [None, "1"])
def test_tf_keras_keeps_naming_what_it_named_before(legacy):
    """Importing the engine (and tfmot) and running a phase leaves `tf.keras` and
    TF_USE_LEGACY_KERAS as the user's environment made them."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    if legacy is not None:
        env["TF_USE_LEGACY_KERAS"] = legacy
    r = subprocess.run([sys.executable, "-c", _TF_KERAS_PROBE], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    module, var = r.stdout.split()[-2:]
    assert var == str(legacy)
    assert module.startswith("tf_keras." if legacy else "keras.src."), module


def _ds_cnn_l2(seed=0, filters=24):
    """A DS-CNN-shaped net as the published keyword-spotting models build it: a strided
    10x4 conv, depthwise-separable blocks, BN + ReLU after every conv, and the L2
    `kernel_regularizer` their training scripts put on every convolution."""
    keras.utils.set_random_seed(seed)
    L, l2 = keras.layers, keras.regularizers.l2(1e-4)
    i = keras.Input((25, 10, 1))
    h = L.Conv2D(filters, (10, 4), strides=(2, 2), padding="same", kernel_regularizer=l2)(i)
    h = L.ReLU()(L.BatchNormalization()(h))
    for _ in range(2):
        h = L.DepthwiseConv2D(3, padding="same", depthwise_regularizer=l2)(h)
        h = L.ReLU()(L.BatchNormalization()(h))
        h = L.Conv2D(filters, 1, kernel_regularizer=l2)(h)
        h = L.ReLU()(L.BatchNormalization()(h))
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(i, L.Dense(6, kernel_regularizer=l2)(h))


def test_pcqat_kernels_stay_on_their_centroids_with_a_regularizer_at_the_default_rate():
    """tfmot's PCQAT writes the clustered kernel into the layer's kernel variable in each
    forward pass; inference and the converter read that variable. An L2 regularizer (or
    weight decay) moved it after the write, by about one optimizer step per weight: at
    Adam(1e-3) a channel clustered to 8 showed 9+ values (published DS-CNN, MobileNet v1
    0.25). Every clustered kernel variable must hold at most 8 values per channel, the
    guard must pass, and the .tflite must keep them."""
    import keras_colopt as colopt
    from keras_colopt.engines.tfmot import read

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 384)
    x = (rng.normal(size=(6, 25, 10, 1))[y] + rng.normal(size=(384, 25, 10, 1))).astype(
        "float32")
    model = _ds_cnn_l2()
    model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    result = colopt.collaborative_fit(
        model, x, y, batch_size=32, verbose=0, rate_policy="compiled",
        phases=[Prune(0.5, epochs=1), Cluster(8, epochs=1), colopt.Quantize(epochs=2)])
    checked = 0
    for layer in result.model.layers:
        for w, _, qvars in getattr(layer, "_weight_vars", []):
            if "cluster_centroids_tf" in qvars:
                per_channel = stats.unique_values(w.numpy(), axis=-1)
                assert max(per_channel) <= 8, (layer.name, max(per_channel))
                assert not any(v is w for v in result.model.trainable_weights)
                checked += 1
    assert checked == 4  # the first conv, two pointwise convs, the Dense
    assert read.wrapper_kind(result.model) == "PCQAT"


@pytest.mark.parametrize("schedule,reached_from", [
    (tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0), 100),   # the tutorials'
    (tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1), 1),
    (tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=7, frequency=5), 7),
    (tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=40,
                                          frequency=10), 40),
    # end_step not on an update: the last update (30) is below target, forever
    (tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=35,
                                          frequency=10), None),
])
def test_target_reached_at_the_first_update_that_makes_it(schedule, reached_from):
    """At every boundary: the step before the update that first holds the target, that step,
    and long after it (a constant schedule has no end, end_step=-1)."""
    from keras_colopt.engines.tfmot.read import target_reached

    if reached_from is None:
        assert not any(target_reached(schedule, s, 0.5) for s in (0, 30, 35, 40, 1000))
        return
    assert not target_reached(schedule, -1, 0.5)
    assert not target_reached(schedule, reached_from - 1, 0.5)
    assert target_reached(schedule, reached_from, 0.5)
    assert target_reached(schedule, reached_from + 1, 0.5)
    assert target_reached(schedule, 10 * reached_from + 1000, 0.5)


def _tutorial_pruned(frequency):
    """tfmot's pruning tutorial: ConstantSparsity(0.5, begin_step=0) on the whole model."""
    model = tiny_sequential()
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=frequency)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    return compile_(pruned)


def test_the_guard_checks_the_tutorial_flow_and_finds_a_kernel_made_dense(digits):
    """With the tutorials' constant schedule the guard expects the target from the first
    mask update on (its end_step is -1: it never "ends"); a kernel made dense between two
    fits (its mask reset to ones) is reported."""
    import keras_colopt as colopt

    (x, y), _ = digits
    pruned = _tutorial_pruned(frequency=4)  # 8 steps: mask updates at steps 4 and 8
    guard = colopt.callbacks.InvariantGuard(sparsity=0.5)
    pruned.fit(x, y, epochs=1, batch_size=64, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), guard])
    assert set(guard.expectations()) == {"conv", "hidden", "logits"}
    for layer in pruned.layers:
        for _, mask, _ in getattr(layer, "pruning_vars", []):
            mask.assign(np.ones(mask.shape, np.float32))
    # One more step (9) is not an update step: the dense kernels stay dense.
    with pytest.raises(colopt.InvariantViolation, match="sparsity expected >= 0.5"):
        pruned.fit(x[:64], y[:64], epochs=1, batch_size=64, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), guard])


def test_a_guard_that_checked_nothing_says_so(digits, caplog):
    """The tutorials' schedule (frequency 100) on a fit of fewer steps never updates a mask:
    nothing can be checked, and the guard says so instead of passing silently."""
    import keras_colopt as colopt

    (x, y), _ = digits
    pruned = _tutorial_pruned(frequency=100)
    guard = colopt.callbacks.InvariantGuard(sparsity=0.5)
    with caplog.at_level(logging.WARNING, logger="keras_colopt"), \
            pytest.warns(RuntimeWarning, match="checked no layer"):
        pruned.fit(x, y, epochs=1, batch_size=64, verbose=0,
                   callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), guard])
    assert any("checked no layer" in r.getMessage() for r in caplog.records)
