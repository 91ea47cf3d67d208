"""`keras-colopt run RECIPE --model M --data D`: end to end on a tiny model, and every input
it refuses before training."""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
import tf_keras as keras

import keras_colopt as colopt
from keras_colopt import Cluster, Prune, Quantize, Train, cli, recipe

from conftest import tiny_sequential
from test_dashboard import read_dashboard


def _fingerprint(*paths):
    return {p: (os.stat(p).st_mtime_ns, hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest())
            for p in paths}


@pytest.fixture
def inputs(tmp_path, digits):
    """A tiny saved model, a tiny .npz and a recipe, in their own folder."""
    (x, y), (xt, yt) = digits
    src = tmp_path / "inputs"
    src.mkdir()
    model_path = str(src / "tiny.keras")
    tiny_sequential().save(model_path)
    data_path = str(src / "data.npz")
    np.savez(data_path, x_train=x[:96], y_train=y[:96], x_val=xt[:32], y_val=yt[:32])
    recipe_path = recipe.dump(
        [Train(epochs=1), Prune(sparsity=0.5, epochs=1, schedule="constant"),
         Cluster(clusters=8, epochs=1), Quantize(epochs=1)], str(src / "recipe.yaml"),
        fit={"batch_size": 32}, export={"quantization": "int8"})
    return recipe_path, model_path, data_path


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training is ever started."""
    def refuse(*args, **kwargs):
        raise AssertionError("collaborative_fit was called")
    monkeypatch.setattr(colopt, "collaborative_fit", refuse)


def test_run_end_to_end_writes_everything_under_out_and_keeps_inputs(inputs, tmp_path, capsys):
    recipe_path, model_path, data_path = inputs
    before = _fingerprint(*inputs)
    out = tmp_path / "out"
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", data_path,
                   "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert _fingerprint(*inputs) == before  # recipe, model and data byte-identical, untouched
    assert sorted(os.listdir(out)) == ["checkpoint", "logs", "model_int8.tflite", "recipe.yaml",
                                       "summary.json", "summary.md"]
    (run,) = os.listdir(out / "logs")
    assert run.startswith("run-") and os.listdir(out / "logs" / run / "compression")
    assert (out / "recipe.yaml").read_bytes() == pathlib.Path(recipe_path).read_bytes()
    s = json.loads((out / "summary.json").read_text())
    assert s["phases"] == ["Train", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]
    assert s["quantization"] == "int8" and s["samples"] == {"train": 96, "validation": 32}
    assert [L["layer"] for L in s["layers"]] == ["conv", "hidden", "logits"]
    for L in s["layers"]:
        # The recipe's 50% sparsity and 8 clusters, as deployed in the int8 .tflite.
        assert L["tflite_sparsity"] >= 0.5 - 0.01, L
        assert L["tflite_unique_per_channel"] <= 8, L
    assert 0 < s["size"]["gzip_bytes"] < s["size"]["tflite_bytes"]
    assert 0.0 <= s["accuracy"]["tflite"] <= 1.0 and 0.0 <= s["accuracy"]["keras"] <= 1.0
    # One progress line per phase, the summary, where the files are, the TensorBoard line.
    for i, label in enumerate(s["phases"], 1):
        assert f"[{i}/4] {label}: epochs {i - 1}-{i - 1}" in printed
    assert "| hidden | 4608 |" in printed and (out / "summary.md").read_text() in printed + "\n"
    assert f"Files: {out} (summary.md, summary.json, model_int8.tflite, recipe.yaml)" in printed
    assert f"tensorboard --logdir {out / 'logs'}" in printed
    # The dashboard's "Deployed model" table of the exported file, in the run's log dir.
    (table,) = read_dashboard(out / "logs" / run)["tflite/model_int8.tflite"]
    assert table["file"] == str(out / "model_int8.tflite")
    assert [r["layer"] for r in table["layers"]] == ["conv", "hidden", "logits"]


def test_run_on_a_target_measures_the_fully_integer_file(inputs, tmp_path, capsys):
    recipe_path, model_path, data_path = inputs
    out = tmp_path / "out"
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", data_path,
                   "--out", str(out), "--quiet", "--no-checkpoint", "--target", "ethos-u55-128"])
    printed = capsys.readouterr().out
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["target"]["target"] == "ethos-u55-128" and s["target"]["cpu_ops"] == {}
    assert s["target"]["file"] == str(out / "model_int8_io.tflite")
    assert "| on ethos-u55-128 (int8 in/out file): latency |" in printed


def test_run_refuses_a_bad_target_before_training(inputs, tmp_path, capsys, no_training):
    recipe_path, model_path, data_path = inputs
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", data_path,
                   "--out", str(tmp_path / "out"), "--target", "ethos-u99"])
    assert rc == 2 and "Unknown Ethos-U `accelerator`" in capsys.readouterr().err


def test_run_interrupted_then_rerun_resumes_into_the_same_tensorboard_run(inputs, tmp_path,
                                                                         capsys, monkeypatch):
    recipe_path, model_path, data_path = inputs
    out = tmp_path / "out"
    argv = ["run", recipe_path, "--model", model_path, "--data", data_path, "--out", str(out),
            "--quiet"]
    real_fit = colopt.collaborative_fit

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    def interrupted_fit(*args, callbacks=(), **kwargs):
        return real_fit(*args, callbacks=[*callbacks, Interrupt()], **kwargs)

    monkeypatch.setattr(colopt, "collaborative_fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert not (out / "model_int8.tflite").exists()
    monkeypatch.setattr(colopt, "collaborative_fit", real_fit)
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_at_epoch"] == 2 and "resumed from its checkpoint after epoch 1" in printed
    assert "[3/4] Cluster (sparsity-preserving): epochs 2-2" in printed
    assert len(os.listdir(out / "logs")) == 1      # the rerun continued the same run folder
    for L in s["layers"]:
        assert L["tflite_sparsity"] >= 0.5 - 0.01 and L["tflite_unique_per_channel"] <= 8


def _npz(tmp_path, name="bad.npz", **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


X = np.zeros((8, 8, 8, 1), np.float32)
Y = np.zeros(8, np.int64)


@pytest.mark.parametrize("arrays,words", [
    ({"x_train": X}, ["missing: ['y_train']", "Expected exactly x_train, y_train"]),
    ({"x_train": X, "y_train": Y, "x_test": X}, ["unexpected: ['x_test']"]),
    ({"x_train": X, "y_train": Y, "x_val": X}, ["x_val and y_val must come together"]),
    ({"x_train": X, "y_train": Y[:5]}, ["x_train has 8 samples but y_train has 5"]),
    ({"x_train": X, "y_train": np.array([object()] * 8)}, ["not a readable .npz of plain arrays"]),
    ({"x_train": np.zeros((8, 4, 4, 1)), "y_train": Y},
     ["x_train has samples of shape (4, 4, 1)", "takes (8, 8, 1)", "(n, 8, 8, 1)"]),
    ({"x_train": np.full((8, 8, 8, 1), "a"), "y_train": Y}, ["dtype <U1", "Expected numbers"]),
    ({"x_train": X, "y_train": Y, "x_val": np.zeros((4, 64)), "y_val": Y[:4]},
     ["x_val has samples of shape (64,)", "Received: x_val.shape=(4, 64)"]),
])
def test_run_refuses_bad_data_before_training(inputs, tmp_path, capsys, no_training, arrays,
                                              words):
    recipe_path, model_path, _ = inputs
    data_path = _npz(tmp_path, **arrays)
    out = tmp_path / "out"
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", data_path,
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("keras-colopt run: error: ")
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()  # nothing written, nothing trained


def test_run_refuses_a_file_that_is_not_npz(inputs, tmp_path, capsys, no_training):
    recipe_path, model_path, _ = inputs
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", recipe_path,
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a readable .npz" in err and "np.savez" in err


def test_run_refuses_an_uncompiled_model(inputs, tmp_path, capsys, no_training):
    recipe_path, _, data_path = inputs
    model = keras.Sequential([keras.layers.Flatten(input_shape=(8, 8, 1)),
                              keras.layers.Dense(10)])
    path = str(tmp_path / "raw.keras")
    model.save(path)
    rc = cli.main(["run", recipe_path, "--model", path, "--data", data_path,
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "is not compiled" in err and "model.compile(" in err
    assert "save it again" in err and path in err


def test_run_checks_the_recipe_before_the_model_and_data(tmp_path, capsys, no_training):
    bad = tmp_path / "r.yaml"
    bad.write_text("phases:\n  - cluster: {clusters: 8, epochs: 1}\n  - prune: {epochs: 1}\n")
    rc = cli.main(["run", str(bad), "--model", str(tmp_path / "missing.keras"),
                   "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}: phases: phases[1] Prune comes after phases[0] Cluster" in err
    assert "missing" not in err


def test_run_refuses_missing_model_file(inputs, tmp_path, capsys, no_training):
    recipe_path, _, data_path = inputs
    rc = cli.main(["run", recipe_path, "--model", str(tmp_path / "nope.keras"), "--data",
                   data_path, "--out", str(tmp_path / "out")])
    assert rc == 2 and "No model at" in capsys.readouterr().err


def test_run_never_overwrites_an_input(inputs, tmp_path, capsys, no_training):
    recipe_path, model_path, data_path = inputs
    out = tmp_path / "out"
    out.mkdir()
    clash = str(out / "summary.json")  # an .npz under the name of an output file
    pathlib.Path(clash).write_bytes(pathlib.Path(data_path).read_bytes())
    before = _fingerprint(clash)
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", clash, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "would be overwritten" in err and "summary.json" in err
    assert _fingerprint(clash) == before


def test_run_refuses_layers_the_model_does_not_have_before_training(inputs, tmp_path, capsys):
    _, model_path, data_path = inputs
    path = recipe.dump([Prune(sparsity=0.5, epochs=1, layers=["dense_99"])],
                       str(tmp_path / "r.json"))
    out = tmp_path / "out"
    rc = cli.main(["run", path, "--model", model_path, "--data", data_path, "--out", str(out),
                   "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2 and "does not fit the model" in captured.err and "dense_99" in captured.err
    assert "[1/1]" not in captured.out and not out.exists()  # no phase ran, nothing written


def test_run_help_documents_the_data_file(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for w in ("RECIPE", "--model", "--data", "--out", "x_train", "y_train", "x_val", "y_val",
              "np.savez", "model.save"):
        assert w in text, w


def test_run_on_a_keras3_model_file(tmp_path, digits, capsys):
    """`keras-colopt run` on a `.keras` file saved by Keras 3: loaded by the Keras 3 engine,
    compressed, exported; the phases it cannot do yet (QAT) are not in this recipe."""
    import keras as k3

    (x, y), (xt, yt) = digits
    k3.utils.set_random_seed(0)
    model = k3.Sequential([k3.Input((8, 8, 1)), k3.layers.Conv2D(8, 3, name="conv"),
                           k3.layers.Flatten(name="flat"), k3.layers.Dense(10, name="logits")])
    model.compile(optimizer="adam", metrics=["accuracy"],
                  loss=k3.losses.SparseCategoricalCrossentropy(from_logits=True))
    model_path = str(tmp_path / "k3.keras")
    model.save(model_path)
    data_path = str(tmp_path / "data.npz")
    np.savez(data_path, x_train=x[:96], y_train=y[:96], x_val=xt[:32], y_val=yt[:32])
    recipe_path = recipe.dump([Prune(sparsity=0.5, epochs=1, schedule="constant"),
                               Cluster(clusters=8, epochs=1)], str(tmp_path / "recipe.yaml"),
                              fit={"batch_size": 32}, export={"quantization": "int8"})
    out = tmp_path / "out"
    rc = cli.main(["run", recipe_path, "--model", model_path, "--data", data_path,
                   "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    assert s["phases"] == ["Prune", "Cluster (sparsity-preserving)"]
    assert [L["layer"] for L in s["layers"]] == ["conv", "logits"]
    assert all(L["tflite_sparsity"] >= 0.49 and L["tflite_unique_per_channel"] <= 8
               for L in s["layers"]), s["layers"]
