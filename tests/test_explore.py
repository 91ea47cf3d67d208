"""explore: the deployment tree built once per node, measured as deployed; the walk."""

import csv
import gzip
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter

import keras_colopt as colopt
from keras_colopt.tree import LEAVES

from conftest import tiny_sequential

B, P, C, Q = 2, 1, 1, 1  # epochs: baseline, prune, cluster, quantize


def _litert_accuracy(path, x, y):
    """Independent of keras_colopt.export: one sample at a time, plain LiteRT."""
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    hits = 0
    for sample, label in zip(x, y):
        it.set_tensor(i["index"], sample[None].astype(np.float32))
        it.invoke()
        hits += int(np.argmax(it.get_tensor(o["index"])) == label)
    return hits / len(y)


@pytest.fixture(scope="module")
def tree(digits, tmp_path_factory):
    (x, y), (xt, yt) = digits
    model = tiny_sequential()
    before = [w.copy() for w in model.get_weights()]
    out = tmp_path_factory.mktemp("tree")
    report = colopt.explore(
        model, x, y, validation_data=(xt, yt), out_dir=out, baseline_epochs=B,
        prune=colopt.Prune(sparsity=0.5, epochs=P), cluster=colopt.Cluster(clusters=8, epochs=C),
        quantize=colopt.Quantize(epochs=Q), batch_size=64, latency_runs=5)
    return report, out, model, before, (xt, yt)


def test_every_leaf_is_built_and_the_user_model_is_untouched(tree):
    report, _, model, before, _ = tree
    assert [r.name for r in report.leaves] == list(LEAVES)
    assert [r.status for r in report.leaves] == ["ok"] * 8, [r.reason for r in report.leaves]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_numbers_come_from_the_files_written(tree):
    report, out, _, _, (xt, yt) = tree
    for r in report.leaves:
        assert os.path.dirname(r.tflite) == os.path.join(str(out), "tflite")
        with open(r.tflite, "rb") as f:
            data = f.read()
        assert r.tflite_bytes == len(data)
        assert r.gzip_bytes == len(gzip.compress(data, compresslevel=9, mtime=0))
        assert r.int8_accuracy == pytest.approx(_litert_accuracy(r.tflite, xt, yt))
        assert r.latency_ms > 0


def test_what_survives_in_each_tflite(tree):
    report, *_ = tree
    by = {r.name: r for r in report.leaves}
    for name in ("Pruned+PTQ", "PQAT", "SparseClustered+PTQ", "PCQAT"):
        assert by[name].sparsity >= 0.49, name        # pruned to 50 %, stored as int8 zeros
    for name in ("PTQ", "QAT", "Clustered+PTQ", "CQAT"):
        assert by[name].sparsity < 0.1, name
    for name in ("Clustered+PTQ", "CQAT", "SparseClustered+PTQ", "PCQAT"):
        assert by[name].max_unique_per_channel <= 8, name
    assert by["PTQ"].max_unique_per_channel > 8
    assert by["QAT"].fp32_accuracy is not None and by["PQAT"].int8_accuracy is not None


def test_prefixes_are_trained_once(tree):
    report, *_ = tree
    # Baseline once, Pruned once, Clustered and SparseClustered once each, four QAT leaves.
    assert report.epochs_run == B + P + 2 * C + 4 * Q
    # One run per leaf: PTQ B, QAT B+Q, Pruned+PTQ B+P, PQAT B+P+Q, Clustered+PTQ B+C,
    # CQAT B+C+Q, SparseClustered+PTQ B+P+C, PCQAT B+P+C+Q.
    assert report.epochs_naive == 8 * B + 4 * P + 4 * C + 4 * Q


def test_json_csv_and_markdown(tree):
    report, out, *_ = tree
    data = json.loads(report.to_json())
    assert data["chosen"] is None and [leaf["name"] for leaf in data["leaves"]] == list(LEAVES)
    for leaf in data["leaves"]:
        assert {"name", "tflite", "fp32_accuracy", "int8_accuracy", "tflite_bytes",
                "gzip_bytes", "latency_ms", "sparsity", "max_unique_weights",
                "status"} <= set(leaf)
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["leaves"] == data["leaves"]
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["name"] for r in rows] == list(LEAVES)
    assert int(rows[0]["gzip_bytes"]) == report.leaves[0].gzip_bytes
    md = report.to_markdown()
    for header in ("| | Baseline | Pruned | QAT | PQAT |",
                   "| | Baseline | Clustered | QAT | CQAT |", "## PCQAT path",
                   "| INT8 full integer quantization |", "| Compression |"):
        assert header in md
    pqat = report.leaf("PQAT")
    assert f"{pqat.tflite_bytes:,} → {pqat.gzip_bytes:,}" in md
    assert "(Fake INT8)" in md


def _png_ok(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = tf.io.decode_png(data)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_plots_have_the_expected_series(tree):
    report, out, *_ = tree
    _png_ok(os.path.join(out, "density.png"))
    _png_ok(os.path.join(out, "pareto.png"))
    assert report.plot_layer == "hidden"   # the largest pruned kernel
    titles = [ax.get_title() for ax in report.density_figure().axes]
    assert [t.split(":")[0] for t in titles] == [
        "Baseline", "Pruned", "Clustered", "SparseClustered", "QAT", "PQAT", "CQAT", "PCQAT"]
    assert "50.0% zeros" in titles[1] and "8 unique" in titles[2]
    ax = report.pareto_figure().axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert set(LEAVES) <= set(labels) and "baseline FP32" in labels
    offsets = {lbl: h.get_offsets()[0] for h, lbl in zip(*ax.get_legend_handles_labels())
               if lbl in LEAVES}
    pcqat = report.leaf("PCQAT")
    assert tuple(offsets["PCQAT"]) == pytest.approx((pcqat.gzip_bytes, 100 * pcqat.int8_accuracy))


def test_tensorboard_has_the_report(tree):
    _, out, *_ = tree
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "logs", "report"), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"report/table", "report/density", "report/pareto"} <= set(acc.Tags()["tensors"])
    # Each node and QAT leaf has its own run, on one continuing epoch axis.
    assert {"Baseline", "Pruned", "PQAT", "PCQAT"} <= set(os.listdir(os.path.join(out, "logs")))


def test_pqat_leaf_equals_the_tfmot_tutorial_flow(digits, tmp_path):
    """Pruned+PTQ and PQAT rebuilt by hand with tfmot (as its tutorials do) give the same
    .tflite outputs as the leaves explore built."""
    (x, y), (xt, yt) = digits
    x, y = x[:128], y[:128]
    base = tiny_sequential()
    base.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    report = colopt.explore(
        base, x, y, validation_data=(xt, yt), out_dir=tmp_path / "tree",
        leaves=["Pruned+PTQ", "PQAT"], batch_size=32, shuffle=False, latency_runs=2,
        prune=colopt.Prune(sparsity=0.5, epochs=1, schedule="constant"),
        quantize=colopt.Quantize(epochs=1), rate_policy="compiled")

    # tfmot's pruning + PQAT tutorials, step by step.
    keras.utils.set_random_seed(0)
    start = keras.models.clone_model(base)
    start.set_weights(base.get_weights())
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        start, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0,
                                                                      frequency=1))
    pruned.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    pqat = tfmot.quantization.keras.quantize_apply(
        tfmot.quantization.keras.quantize_annotate_model(stripped),
        tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())
    # Quantize trains at the compiled rate (rate_policy='compiled').
    pqat.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pqat.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)

    def convert(model, path):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([s[None]] for s in x[:256])
        if model is stripped:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        path.write_bytes(conv.convert())
        return str(path)

    for leaf, model in (("Pruned+PTQ", stripped), ("PQAT", pqat)):
        hand = convert(model, tmp_path / f"{leaf}.tflite")
        ours = report.leaf(leaf)
        assert ours.status == "ok", ours.reason
        np.testing.assert_allclose(colopt.export.predict_tflite(ours.tflite, xt),
                                   colopt.export.predict_tflite(hand, xt), atol=1e-6)
        assert ours.int8_accuracy == pytest.approx(_litert_accuracy(hand, xt, yt))
        assert ours.gzip_bytes == pytest.approx(colopt.export.gzip_size(hand), rel=0.02)
        assert ours.sparsity == pytest.approx(
            np.mean([w.sparsity for w in colopt.export.inspect_tflite(hand)]), abs=0.01)


def _leaky(seed=0):
    """Conv2D -> standalone ReLU(negative_slope=0.1): tfmot would quantize the conv without
    preserving its sparsity, which collaborative_fit refuses (it cannot be folded)."""
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, name="conv")(i)
    h = keras.layers.ReLU(negative_slope=0.1, name="leaky")(h)
    h = keras.layers.Flatten()(h)
    o = keras.layers.Dense(10, name="logits")(h)
    m = keras.Model(i, o)
    m.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def test_a_failing_leaf_is_reported_and_the_others_finish(digits, tmp_path):
    (x, y), (xt, yt) = digits
    report = colopt.explore(
        _leaky(), x[:128], y[:128], validation_data=(xt, yt), out_dir=tmp_path,
        leaves=["PTQ", "Pruned+PTQ", "PQAT", "QAT"], batch_size=64, latency_runs=2,
        prune=colopt.Prune(sparsity=0.5, epochs=1), quantize=colopt.Quantize(epochs=1))
    status = {r.name: r.status for r in report.leaves}
    assert status == {"PTQ": "ok", "Pruned+PTQ": "ok", "PQAT": "failed", "QAT": "ok"}
    assert "standalone activation" in report.leaf("PQAT").reason
    assert not (tmp_path / "tflite" / "pqat_int8.tflite").exists()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [leaf["status"] for leaf in saved["leaves"]] == ["ok", "ok", "failed", "ok"]
    assert "| PQAT | failed |" in (tmp_path / "report.md").read_text()


def test_a_converter_error_fails_only_its_leaves(digits, tmp_path, monkeypatch):
    (x, y), (xt, yt) = digits
    real = colopt.export.convert

    def convert(model, quantization="int8", representative_data=None, sparse=False, io="float32"):
        if any(type(l).__name__ == "QuantizeWrapperV2" for l in model.layers):
            raise RuntimeError("converter exploded\nwith a long trace")
        return real(model, quantization, representative_data, sparse=sparse, io=io)

    monkeypatch.setattr(colopt.export, "convert", convert)
    report = colopt.explore(
        tiny_sequential(), x[:128], y[:128], validation_data=(xt, yt), out_dir=tmp_path,
        leaves=["PTQ", "QAT", "Clustered+PTQ", "CQAT"], batch_size=64, latency_runs=2,
        cluster=colopt.Cluster(clusters=8, epochs=1), quantize=colopt.Quantize(epochs=1))
    assert [r.status for r in report.leaves] == ["ok", "failed", "ok", "failed"]
    assert report.leaf("CQAT").reason == "RuntimeError: converter exploded"
    assert sorted(os.listdir(tmp_path / "tflite")) == [
        "baseline_float.tflite", "clustered_ptq_int8.tflite", "ptq_int8.tflite"]
    assert (tmp_path / "density.png").exists() and (tmp_path / "pareto.png").exists()


def test_an_interrupted_explore_keeps_what_it_measured(digits, tmp_path, monkeypatch):
    from keras_colopt import tree

    (x, y), (xt, yt) = digits
    real = tree._Tree.leaf

    def leaf(self, name):
        if name == "Pruned+PTQ":
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(tree._Tree, "leaf", leaf)
    with pytest.raises(KeyboardInterrupt):
        colopt.explore(tiny_sequential(), x[:128], y[:128], validation_data=(xt, yt),
                       out_dir=tmp_path, leaves=["PTQ", "Pruned+PTQ", "PQAT"], latency_runs=2)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [leaf["status"] for leaf in saved["leaves"]] == ["ok", "interrupted", "interrupted"]
    ptq = saved["leaves"][0]
    assert os.path.getsize(ptq["tflite"]) == ptq["tflite_bytes"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".colopt-")]


def test_cli_report_on_a_saved_model(digits, tmp_path, capsys):
    from keras_colopt import cli

    (x, y), (xt, yt) = digits
    model_path, data_path = tmp_path / "m.keras", tmp_path / "d.npz"
    tiny_sequential().save(model_path)
    np.savez(data_path, x_train=x[:128], y_train=y[:128], x_val=xt, y_val=yt)
    snapshot = {p: p.read_bytes() for p in (model_path, data_path)}
    out = tmp_path / "out"
    rc = cli.main(["report", "--out", str(out), "--model", str(model_path), "--data",
                   str(data_path), "--leaves", "PTQ,Pruned+PTQ", "--prune-epochs", "1",
                   "--max-accuracy-drop", "0.5", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| PTQ | ok |" in printed and "Chosen: **PTQ**" in printed
    assert {"report.md", "report.csv", "report.json", "density.png", "pareto.png",
            "tflite", "logs"} <= set(os.listdir(out))
    assert all(p.read_bytes() == b for p, b in snapshot.items())


def test_cli_report_refuses_bad_inputs_before_training(digits, tmp_path, capsys):
    from keras_colopt import cli

    (x, y), _ = digits
    data_path = tmp_path / "d.npz"
    np.savez(data_path, x_train=x[:16], y_train=y[:16])   # no validation split
    model_path = tmp_path / "m.keras"
    tiny_sequential().save(model_path)
    assert cli.main(["report", "--out", str(tmp_path / "o"), "--model", str(model_path)]) == 2
    assert "go together" in capsys.readouterr().err
    assert cli.main(["report", "--out", str(tmp_path / "o"), "--model", str(model_path),
                     "--data", str(data_path)]) == 2
    assert "missing: ['x_val', 'y_val']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_entropy_bound_is_reported_per_leaf(tree):
    report, *_ = tree
    for r in report.leaves:
        weights = colopt.export.read_weights(r.tflite)
        raw = sum(w.size for w in weights.values())
        assert 0 < r.weights_entropy_bytes <= raw           # at most 8 bits per int8 weight
        assert r.weights_gzip_bytes == colopt.export.gzip_size(
            b"".join(w.tobytes() for w in weights.values()))
    by = {r.name: r for r in report.leaves}
    # 8 clusters and half zeros need far fewer bits than a free int8 tensor.
    assert by["PCQAT"].weights_entropy_bytes < 0.5 * by["PTQ"].weights_entropy_bytes
    assert "| PCQAT |" in report.to_markdown().split("entropy bound")[1]
