"""Distillation from the float model (`collaborative_fit(distill=...)`), on both engines: the
loss of one step is the specified mix to the last digit, unlabelled data compresses end to
end, and a teacher that does not fit the student is refused before training."""

import numpy as np
import pytest

import keras_colopt as colopt
from keras_colopt.callbacks import layer_stats

from conftest import distil_one_step, linear as _linear, tiny_sequential

T, W = 3.0, 0.3


def _keras(name):
    return pytest.importorskip("tf_keras" if name == "tfmot" else "keras")


ENGINES = ["tfmot", "keras3"]


@pytest.mark.parametrize("engine", ENGINES)
def test_one_step_minimizes_the_specified_mix_and_logs_both_losses(engine):
    r, teacher, wt, (hard, soft, w1, b1) = distil_one_step(_keras(engine), temperature=T,
                                                          weight=W)
    h = r.history.history
    np.testing.assert_allclose(h["loss"][0], hard, rtol=1e-5)
    np.testing.assert_allclose(h["distill_loss"][0], soft, rtol=1e-5)
    np.testing.assert_allclose(r.model.get_weights()[0], w1, atol=1e-5)
    np.testing.assert_allclose(r.model.get_weights()[1], b1, atol=1e-5)
    # The teacher is not trained.
    np.testing.assert_array_equal(teacher.get_weights()[0], wt.astype(np.float32))


@pytest.mark.parametrize("engine", ENGINES)
def test_unlabelled_data_compresses_end_to_end(digits, tmp_path, engine):
    """The float model labels the data: Prune -> Cluster -> PCQAT with y=None keeps its
    invariants, agrees with the float model, and exports."""
    keras = _keras(engine)
    (x, y), (xt, yt) = digits
    model = tiny_sequential(keras=keras)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    float_pred = np.argmax(model.predict(xt, verbose=0), axis=-1)
    r = colopt.collaborative_fit(
        model, x, None, phases=[colopt.Prune(sparsity=0.5, epochs=2),
                                colopt.Cluster(clusters=8, epochs=1), colopt.Quantize(epochs=1)],
        distill=True, validation_data=(xt, yt), batch_size=32, verbose=0)
    h = r.history.history
    assert h["phase"] == ["Prune", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]
    assert h["loss"] == h["distill_loss"] and "val_accuracy" in h
    assert h["accuracy"][-1] >= 0.8  # agreement with the teacher on the training inputs
    for name, st in layer_stats(r.model).items():
        assert st.sparsity >= 0.49 and st.unique_per_channel_max <= 8 + 1, (name, st)
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8")
    deployed = colopt.export.predict_tflite(info.path, xt)
    agreement = np.mean(np.argmax(deployed, axis=-1) == float_pred)
    assert agreement >= 0.85, agreement


@pytest.mark.parametrize("engine", ENGINES)
def test_a_teacher_that_does_not_fit_is_refused_before_training(digits, tmp_path, engine):
    keras = _keras(engine)
    (x, y), _ = digits
    x = x[:64].reshape(64, 64)
    student = _linear(keras, 0, 0.1)
    before = [w.copy() for w in student.get_weights()]
    with pytest.raises(ValueError, match=r"teacher's outputs \[\(5,\)\] do not match the "
                                         r"student's \[\(10,\)\]"):
        colopt.collaborative_fit(student, x, y[:64], phases=[colopt.Train(epochs=1)],
                                 distill=colopt.Distill(teacher=_linear(keras, 1, classes=5)),
                                 log_dir=tmp_path / "logs", verbose=0)
    other = _keras("keras3" if engine == "tfmot" else "tfmot")
    with pytest.raises(ValueError, match="not a model of the student's Keras"):
        colopt.collaborative_fit(student, x, y[:64], phases=[colopt.Train(epochs=1)],
                                 distill=colopt.Distill(teacher=_linear(other, 1)), verbose=0)
    with pytest.raises(ValueError, match="no labels to train on.*distill=True"):
        colopt.collaborative_fit(student, x, None, phases=[colopt.Train(epochs=1)], verbose=0)
    assert not (tmp_path / "logs").exists()
    assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights()))


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(temperature=float("inf")),
                                 dict(weight=0), dict(weight=1.5), dict(weight=True)])
def test_distill_settings_are_checked(bad):
    with pytest.raises(ValueError, match="Distill: `(temperature|weight)` must be"):
        colopt.Distill(**bad)


def test_distill_argument_is_checked(digits):
    (x, y), _ = digits
    with pytest.raises(ValueError, match="`distill` must be True, False, None or"):
        colopt.collaborative_fit(tiny_sequential(), x, y, phases=[colopt.Train(epochs=1)],
                                 distill="yes", verbose=0)


def test_a_checkpoint_resumes_only_with_the_same_distillation(digits, tmp_path):
    keras = _keras("keras3")
    (x, y), _ = digits

    def fit(**distill):
        return colopt.collaborative_fit(
            tiny_sequential(keras=keras), x[:128], y[:128], batch_size=64, verbose=0,
            phases=[colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=1)],
            checkpoint_dir=tmp_path / "ckpt", distill=colopt.Distill(**distill))
    first = fit(temperature=2.0)
    assert fit(temperature=2.0).resumed_at == 2
    with pytest.raises(colopt.CheckpointMismatch, match="the distillation differs"):
        fit(temperature=5.0)
    assert len(first.history.history["distill_loss"]) == 2


def test_the_drop_in_callback_distils_inside_one_plain_fit(digits):
    """Keras 3: CollaborativeOptimization(distill=...) adds the soft-target loss to every
    phase of the user's own fit; afterwards the model trains as compiled again."""
    keras = _keras("keras3")
    (x, y), (xt, yt) = digits
    model = tiny_sequential(keras=keras)
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    h = model.fit(x, y, epochs=3, batch_size=32, verbose=0, validation_data=(xt, yt),
                  callbacks=[colopt.callbacks.CollaborativeOptimization(
                      [colopt.Prune(sparsity=0.5, epochs=2), colopt.Cluster(clusters=8, epochs=1)],
                      distill=colopt.Distill(teacher=teacher, temperature=T, weight=W))])
    assert len(h.history["distill_loss"]) == 3 and h.history["distill_loss"][0] > 0
    assert h.history["loss"] != h.history["distill_loss"]
    for name, st in layer_stats(model).items():
        assert st.sparsity >= 0.49 and st.unique_per_channel_max <= 8 + 1, (name, st)
    assert "train_step" not in vars(model)
    again = model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert "distill_loss" not in again.history


def test_the_returned_model_trains_as_compiled(digits):
    (x, y), _ = digits
    r = colopt.collaborative_fit(tiny_sequential(keras=_keras("keras3")), x, y, verbose=0,
                                 phases=[colopt.Prune(sparsity=0.5, epochs=1)], distill=True)
    assert "distill_loss" in r.history.history and "train_step" not in vars(r.model)


def test_explore_distils_every_node_from_the_baseline(digits, tmp_path, monkeypatch):
    (x, y), (xt, yt) = digits
    model = tiny_sequential(keras=_keras("keras3"))
    with pytest.raises(ValueError, match="distils from the baseline, but baseline_epochs=2"):
        colopt.explore(model, x, y, validation_data=(xt, yt), out_dir=tmp_path / "a",
                       baseline_epochs=2, distill=True)
    teachers = []
    real = colopt.distill.make_teacher

    def spy(engine, student, settings, scope=None):
        teachers.append(settings.teacher)
        return real(engine, student, settings)
    monkeypatch.setattr(colopt.distill, "make_teacher", spy)
    report = colopt.explore(model, x, y, validation_data=(xt, yt), out_dir=tmp_path / "b",
                            leaves=["PQAT"], prune=colopt.Prune(sparsity=0.5, epochs=1),
                            quantize=colopt.Quantize(epochs=1), latency_runs=1, distill=True)
    assert report.leaf("PQAT").ok
    # Both nodes (the pruned model, then PQAT from it) distil from one copy of the baseline.
    assert len(teachers) == 2 and teachers[0] is teachers[1]
    np.testing.assert_array_equal(teachers[0].get_weights()[0], model.get_weights()[0])
