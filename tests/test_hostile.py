"""Hostile and broken inputs: each one is refused before training with a clear message, or
has a documented fallback, and nothing is left half-written or created where it should not.

Also covered elsewhere: NaN loss (test_checkpoint), a recipe that is not YAML (test_recipe),
a layer name that does not exist (test_fit's refusal table), an interrupted explore
(test_explore), a kill during a checkpoint write (test_checkpoint)."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt import export

from conftest import compile_, tiny_sequential

PHASES = [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=1)]


def _refused(model, x, y, tmp_path, match, **kw):
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=match):
        colopt.collaborative_fit(model, x, y, phases=PHASES, verbose=0,
                                 log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt",
                                 **kw)
    # Refused before training: the model is untouched, no folder was created.
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


def test_empty_arrays(digits, tmp_path):
    (x, y), _ = digits
    _refused(tiny_sequential(), x[:0], y[:0], tmp_path, "No training samples")


def test_empty_dataset(digits, tmp_path):
    (x, y), _ = digits
    ds = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(32)
    _refused(tiny_sequential(), ds, None, tmp_path, "empty")


def test_dataset_smaller_than_one_batch_with_drop_remainder_is_empty(digits, tmp_path):
    (x, y), _ = digits
    ds = tf.data.Dataset.from_tensor_slices((x[:10], y[:10])).batch(64, drop_remainder=True)
    _refused(tiny_sequential(), ds, None, tmp_path, "smaller than one batch")


def test_arrays_smaller_than_one_batch_train_on_one_partial_batch(digits, tmp_path):
    """Documented fallback: 10 samples with batch_size=64 is one step per epoch."""
    (x, y), _ = digits
    result = colopt.collaborative_fit(tiny_sequential(), x[:10], y[:10], phases=PHASES,
                                      batch_size=64, verbose=0, checkpoint_dir=tmp_path)
    assert result.history.epoch == [0, 1]
    sparsity = colopt.callbacks.layer_stats(result.model)["hidden"].sparsity
    assert sparsity == pytest.approx(0.5, abs=0.01)  # the one-step ramp still reaches it


def test_a_model_with_no_prunable_layer(tmp_path):
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([
        keras.layers.DepthwiseConv2D(8, depth_multiplier=10, input_shape=(8, 8, 1),
                                     name="depthwise"),   # tfmot never prunes these
        keras.layers.Flatten(name="flat")]))
    x, y = np.zeros((16, 8, 8, 1), np.float32), np.zeros(16, np.int64)
    _refused(model, x, y, tmp_path, r"Prune: model .* has no layer this phase can prune")


def _unwritable_dir(tmp_path):
    """A folder in which nothing can be created, also for root (who ignores chmod)."""
    if os.geteuid() == 0:
        if os.path.isdir("/sys") and not os.access("/sys/colopt-probe", os.F_OK):
            return "/sys"
        pytest.skip("no unwritable folder for root here")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def test_tflite_path_in_an_unwritable_directory(tmp_path, monkeypatch):
    folder = _unwritable_dir(tmp_path)
    converted = []
    monkeypatch.setattr(export, "convert", lambda *a, **k: converted.append(1) or b"x")
    with pytest.raises(PermissionError, match="nothing can be created in") as e:
        export.to_tflite(tiny_sequential(), os.path.join(folder, "m.tflite"), "none")
    assert "Pick a folder you can write to" in str(e.value)
    assert not converted            # refused before converting
    assert not os.path.exists(os.path.join(folder, "m.tflite"))


def test_checkpoint_and_log_dirs_in_an_unwritable_directory(digits, tmp_path):
    (x, y), _ = digits
    folder = _unwritable_dir(tmp_path)
    for kw in ({"checkpoint_dir": os.path.join(folder, "ckpt")},
               {"log_dir": os.path.join(folder, "logs")}):
        with pytest.raises(PermissionError, match="Pick a folder you can write to"):
            colopt.collaborative_fit(tiny_sequential(), x[:32], y[:32], phases=PHASES,
                                     verbose=0, **kw)


def test_inf_loss_is_caught_like_nan(digits):
    (x, y), _ = digits
    model = tiny_sequential()

    class Blowup(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                for v in self.model.trainable_variables:
                    v.assign(v * 1e38)

    with pytest.raises(colopt.TrainingDiverged, match=r"loss of epoch 1 is (inf|nan)"):
        colopt.collaborative_fit(model, x[:64], y[:64], phases=PHASES, verbose=0,
                                 callbacks=[Blowup()])
