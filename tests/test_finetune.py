"""The fine-tuning rate policy: the probe's choice rule, its measurement, and how each entry
point uses it (collaborative_fit, the drop-in callback, a resumed run)."""

import logging

import numpy as np
import pytest

import keras
import keras_colopt as colopt
from keras_colopt import finetune

from conftest import compile_


def _net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                             keras.layers.Flatten(), keras.layers.Dense(10)])


def test_choose_keeps_the_largest_rate_within_tolerance_of_the_best():
    probe = colopt.RateProbe(tolerance=0.05)
    assert probe.choose({1e-3: 0.50, 3e-4: 0.40, 1e-4: 0.41, 3e-5: 0.45}) == 3e-4
    assert probe.choose({1e-3: 0.42, 3e-4: 0.40, 1e-4: 0.41}) == 1e-3  # 0.42 <= 1.05 * 0.40
    assert probe.choose({1e-3: float("nan"), 1e-4: 0.9, 1e-5: 0.5}) == 1e-5
    assert probe.choose({1e-3: float("inf"), 1e-4: float("nan")}) == 1e-4  # nothing finite
    assert colopt.RateProbe(tolerance=0.3).choose({1e-3: 0.5, 1e-4: 0.4}) == 1e-3


@pytest.mark.parametrize("kwargs,match", [
    ({"factors": ()}, "factors"), ({"factors": (1.0, -0.1)}, "factors"),
    ({"steps": 0}, "steps"), ({"eval_batches": 1.5}, "eval_batches"),
    ({"tolerance": 1.0}, "tolerance"), ({"tolerance": True}, "tolerance")])
def test_rate_probe_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        colopt.RateProbe(**kwargs)


def test_rate_probe_config_round_trip():
    probe = colopt.RateProbe(factors=(0.1, 1.0), steps=4, eval_batches=2, tolerance=0.1, seed=3)
    assert colopt.RateProbe.from_config(probe.get_config()) == probe
    assert probe.factors == (1.0, 0.1)  # largest first


def test_rate_policy_is_checked_before_training(digits):
    (x, y), _ = digits
    model = compile_(_net(), keras=keras)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="rate_policy"):
        colopt.collaborative_fit(model, x, y, phases=[colopt.Prune(0.5, epochs=1)],
                                 rate_policy="tenth", verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_probe_rates_leaves_weights_and_optimizer_as_they_were(digits):
    (x, y), _ = digits
    model = compile_(_net(), lr=1e-2, keras=keras)
    model.fit(x[:64], y[:64], epochs=1, verbose=0)  # an optimizer with state
    weights = [w.copy() for w in model.get_weights()]
    data, why = finetune.probe_data(x, y, 32, colopt.RateProbe(steps=3, eval_batches=2))
    assert why == "" and len(data.train) == 3 and len(data.eval) == 2
    losses = finetune.probe_rates(model, data, [1e-1, 1e-3])
    assert set(losses) == {1e-1, 1e-3} and all(np.isfinite(v) for v in losses.values())
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-2)
    assert int(model.optimizer.iterations.numpy()) == 0


def _trained_then_recompiled(digits, rate, epochs=8):
    """The demo net trained to the bottom of a decaying schedule, compiled again at `rate`."""
    (x, y), _ = digits
    model = _net()
    steps = epochs * -(-len(x) // 32)
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-2, steps)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return compile_(model, lr=rate, keras=keras)


def test_the_probe_steps_down_from_a_rate_that_throws_the_model_out(digits, caplog):
    """A converged model compiled again at a rate far too large for it (0.3 with Adam): the
    probe measures the loss rising at that rate and trains each compression phase at a
    smaller one, logged with the losses it saw; the phase's optimizer runs at that rate."""
    (x, y), _ = digits
    model = _trained_then_recompiled(digits, 0.3)
    seen = []

    class Rate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(float(self.model.optimizer.learning_rate.numpy()))

    with caplog.at_level(logging.INFO, logger="keras_colopt"):
        colopt.collaborative_fit(model, x, y, batch_size=32, verbose=0, callbacks=[Rate()],
                                 phases=[colopt.Prune(0.5, epochs=1),
                                         colopt.Quantize(epochs=1, learning_rate=1e-4)])
    assert seen[0] < 0.3 and seen[1] == pytest.approx(1e-4)
    lines = [r.getMessage() for r in caplog.records if "learning rate" in r.getMessage()]
    assert f"learning rate {seen[0]:g} (probed: " in lines[0], lines
    assert "probe loss by rate 0.3: " in lines[0]
    assert "learning rate 0.0001 (the phase's learning_rate)" in lines[1]


def test_without_labels_the_phase_says_it_could_not_probe(digits, caplog):
    (x, y), _ = digits
    model = compile_(_net(), lr=1e-2, keras=keras)
    with caplog.at_level(logging.INFO, logger="keras_colopt"):
        colopt.collaborative_fit(model, x, None, distill=True, batch_size=64, verbose=0,
                                 phases=[colopt.Prune(0.5, epochs=1)])
    assert any(f"learning rate {1e-2 * finetune.FALLBACK_FRACTION:g} "
               f"({finetune.FALLBACK_FRACTION:g} x the compiled 0.01: no rate probe, no labels"
               in r.getMessage() for r in caplog.records)


def test_drop_in_probes_with_probe_data_and_falls_back_without(digits, caplog):
    (x, y), _ = digits
    for probe_data, expect in (((x[:256], y[:256]), "probed: "),
                               (None, "no rate probe, no probe_data given")):
        model = _trained_then_recompiled(digits, 0.3)
        cb = colopt.callbacks.CollaborativeOptimization(
            [colopt.Prune(0.5, epochs=1), colopt.Cluster(4, epochs=1)], probe_data=probe_data)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="keras_colopt"):
            model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[cb])
        lines = [r.getMessage() for r in caplog.records if "learning rate" in r.getMessage()]
        assert len(lines) == 2 and all(expect in line for line in lines), lines
        rate = float(model.optimizer.learning_rate.numpy())
        if probe_data is None:
            assert rate == pytest.approx(0.3 * finetune.FALLBACK_FRACTION)
        else:
            assert rate < 0.3


def test_drop_in_refuses_probe_data_it_cannot_use():
    with pytest.raises(ValueError, match="probe_data"):
        colopt.callbacks.CollaborativeOptimization([colopt.Prune(0.5, epochs=1)],
                                                   probe_data=np.zeros((4, 8, 8, 1)))


def test_regression_guard_a_decay_trained_net_compiled_at_keras_default_keeps_its_accuracy(
        digits, tmp_path):
    """The way users hand us a model: trained to the bottom of a decaying schedule, then
    compiled again at Keras' default Adam(1e-3). With the default policy, its PCQAT int8
    .tflite must stay within 1.5 points of its float accuracy (issue 24's target)."""
    (x, y), (xt, yt) = digits
    model = _trained_then_recompiled(digits, 1e-3, epochs=20)
    float_acc = model.evaluate(xt, yt, verbose=0)[1]
    result = colopt.collaborative_fit(model, x, y, batch_size=32, verbose=0, phases=[
        colopt.Prune(0.5, epochs=2), colopt.Cluster(8, epochs=2), colopt.Quantize(epochs=1)])
    info = colopt.export.to_tflite(result.model, tmp_path / "m.tflite", quantization="int8")
    int8_acc = colopt.export.evaluate_tflite(info.path, xt, yt)
    assert float_acc > 0.9
    assert int8_acc >= float_acc - 0.015, (float_acc, int8_acc)
