"""Checkpoints and resume: a run killed anywhere continues exactly where it was."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt.checkpoint import CheckpointMismatch

from conftest import tiny_sequential

SCRIPT = os.path.join(os.path.dirname(__file__), "resume_run.py")
EPOCHS = 5            # resume_run.PHASES: Train 1, Prune 2, Cluster 1, Quantize 1
LABELS = ["Train", "Prune", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]


def _run(out, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, SCRIPT, str(out), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def _weights(out):
    with np.load(os.path.join(out, "result.npz")) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _history(out):
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _epoch_steps(log_dir, run="train", tag="epoch_loss"):
    """The epoch steps TensorBoard shows for `tag`: read as its server reads them (its
    plugin accumulator drops the steps orphaned by a restart)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(log_dir, run), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)]


@pytest.mark.parametrize("kill,resumed_at", [
    (("--kill-epoch", 2, "--kill-batch", 3), 2),   # mid-epoch, inside the Prune phase
    (("--kill-epoch", 3, "--kill-batch", 0), 3),   # right at the Prune -> Cluster boundary
    (("--kill-in-save", 3), 2),                    # while writing the checkpoint of epoch 3
])
def test_sigkill_then_rerun_continues_exactly(reference, tmp_path, kill, resumed_at):
    killed = _run(tmp_path, *kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "result.npz").exists()
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    h, ref = _history(tmp_path), _history(reference)
    assert h["resumed_at"] == resumed_at
    assert h["epoch"] == list(range(EPOCHS)) and h["phase"] == LABELS
    # Each phase trains at the rate of the uninterrupted run; one resumed inside it at the
    # rate its probe chose before the kill (kept in the checkpoint), without probing again.
    first = h["rates"][0].split("learning rate ")[1].split(" ")[0]
    want = [r for r in _history(reference)["rates"] if LABELS[resumed_at] + "," in r][0]
    assert first == want.split("learning rate ")[1].split(" ")[0]
    inside = LABELS[resumed_at] == LABELS[resumed_at - 1]
    assert ("(as chosen before the resume)" in h["rates"][0]) == inside, h["rates"]
    assert h["loss"] == ref["loss"]                      # same epochs, same order, same data
    for layer, (sparsity, unique) in h["layers"].items():  # PCQAT kept Prune's and Cluster's
        assert sparsity >= 0.5 - 0.005 and unique <= 4, layer
    for a, b in zip(_weights(tmp_path), _weights(reference)):
        np.testing.assert_array_equal(a, b)               # masks, centroids, ranges, optimizer
    assert _epoch_steps(tmp_path / "logs") == list(range(EPOCHS))
    assert _epoch_steps(tmp_path / "logs", "validation") == list(range(EPOCHS))
    assert _epoch_steps(tmp_path / "logs", "compression", "sparsity/hidden") == list(
        range(EPOCHS))
    # The dashboard: every epoch once, the plan's phases, each epoch's figures those of the
    # resumed run (they equal the uninterrupted run's, whose weights are the same).
    from test_dashboard import dashboard_client, run_data

    d, want = (run_data(dashboard_client(out / "logs"), "colopt") for out in (tmp_path, reference))
    assert d["epochs"] == list(range(EPOCHS)) and d["epoch_phase"] == LABELS
    assert d["metrics"] == want["metrics"] and d["layers"] == want["layers"]
    assert d["invariants"]["status"] == want["invariants"]["status"]
    left = sorted(os.listdir(tmp_path / "ckpt"))
    assert left == ["entry-3.npz", "manifest.json", f"state-{EPOCHS:05d}"]


def _fit(x, y, ckpt, phases, model=None, **kw):
    return colopt.collaborative_fit(model or tiny_sequential(), x, y, phases=phases,
                                    batch_size=32, verbose=0, checkpoint_dir=ckpt, **kw)


PHASES = [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=2)]


def _snapshot(folder):
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder)}


@pytest.mark.parametrize("change,words", [
    (dict(phases=[colopt.Train(epochs=1), colopt.Prune(sparsity=0.7, epochs=2)]),
     "the phases differ"),
    (dict(model="wide"), "the model differs"),
    (dict(samples=96), "steps per epoch differ"),
])
def test_a_checkpoint_of_another_run_is_refused(digits, tmp_path, change, words):
    (x, y), _ = digits
    _fit(x[:64], y[:64], tmp_path, PHASES)
    before = _snapshot(tmp_path)
    model = tiny_sequential()
    if change.get("model") == "wide":
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.layers.Flatten(input_shape=(8, 8, 1)),
                                  keras.layers.Dense(32, name="hidden"),
                                  keras.layers.Dense(10, name="logits")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    weights = [w.copy() for w in model.get_weights()]
    n = change.get("samples", 64)
    with pytest.raises(CheckpointMismatch, match=words) as e:
        _fit(x[:n], y[:n], tmp_path, change.get("phases", PHASES), model=model)
    assert "use a new checkpoint_dir" in str(e.value)
    assert _snapshot(tmp_path) == before                  # nothing in it was touched
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


def test_a_finished_run_rerun_returns_at_once(digits, tmp_path):
    (x, y), _ = digits
    first = _fit(x[:64], y[:64], tmp_path, PHASES)
    again = _fit(x[:64], y[:64], tmp_path, PHASES)
    assert again.resumed_at == 3 and again.history.epoch == [0, 1, 2]
    assert again.history.history["loss"] == pytest.approx(first.history.history["loss"])
    for a, b in zip(first.model.get_weights(), again.model.get_weights()):
        np.testing.assert_array_equal(a, b)


class Poison(keras.callbacks.Callback):
    """Makes the loss NaN from epoch `at` on (a diverging run)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            for v in self.model.trainable_variables:
                v.assign(v * np.nan)


def test_nan_loss_stops_the_phase_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    (x, y), _ = digits
    with pytest.raises(colopt.TrainingDiverged) as e:
        _fit(x[:64], y[:64], tmp_path, PHASES, callbacks=[Poison(2)])
    msg = str(e.value)
    assert "Prune: the training loss of epoch 2 is nan" in msg
    assert f"last good checkpoint (2 epochs done) is kept in {tmp_path}" in msg
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f)["epochs_done"] == 2
    resumed = _fit(x[:64], y[:64], tmp_path, PHASES)
    assert resumed.resumed_at == 2 and resumed.history.epoch == [0, 1, 2]
    assert all(np.isfinite(w).all() for w in resumed.model.get_weights())


def test_nan_without_checkpoints_says_how_to_keep_one(digits):
    (x, y), _ = digits
    with pytest.raises(colopt.TrainingDiverged, match="pass checkpoint_dir"):
        colopt.collaborative_fit(tiny_sequential(), x[:64], y[:64], phases=PHASES,
                                 batch_size=32, verbose=0, callbacks=[Poison(1)])


def test_foreign_files_and_bad_folders_are_refused(digits, tmp_path):
    (x, y), _ = digits
    (tmp_path / "state-00001").mkdir()
    with pytest.raises(CheckpointMismatch, match="no manifest.json"):
        _fit(x[:64], y[:64], tmp_path, PHASES)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        _fit(x[:64], y[:64], f, PHASES)
    shutil.rmtree(tmp_path / "state-00001")


def test_the_restart_marker_touches_only_the_run_s_own_folders(tmp_path):
    """A resumed run tells TensorBoard its epochs restart: in its own folders (train/,
    validation/, compression/, colopt/), never in another run's under a shared parent."""
    from keras_colopt.tensorboard import summary

    for folder in ("train", "validation", "compression", "colopt", "other_run/train", "notes"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "events.out.tfevents.1700000000.host.1.v2").write_bytes(b"")
    summary.restart_runs(tmp_path, 3)
    marked = sorted(str(p.parent.relative_to(tmp_path)) for p in tmp_path.rglob("*~restart*"))
    assert marked == ["colopt", "compression", "train", "validation"]
