"""The keras_colopt dashboard's backend: what the callbacks, export and explore write, read
back through TensorBoard's own data provider, and every route of the plugin.

The runs come from `conftest.dashboard_logs` (a tiny collaborative_fit with its .tflite, a
plain fit whose guard finds a violation, a two-leaf explore). Values are compared with
what the model's effective kernels and the .tflite hold, computed here with numpy.
"""

import glob
import gzip
import importlib
import json
import math
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester
from tensorboard.backend.event_processing import data_provider as tb_data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from keras_colopt import export, targets
from keras_colopt.tensorboard import metadata, plugin, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "/data/plugin/keras_colopt"


def read_dashboard(log_dir):
    """{tag: [JSON document, ...]} of a run's dashboard folder, in file and write order
    (for tests of the writers; the plugin itself reads through TensorBoard)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "colopt", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                assert v.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
                out.setdefault(v.tag, []).append(json.loads(v.tensor.string_val[0]))
    return out


def dashboard_client(logdir):
    """A werkzeug client of a TensorBoard app that serves only this plugin, over
    TensorBoard's multiplexer data provider on `logdir` (loaded once)."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance=data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE)
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = tb_data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(data_provider=provider, logdir=str(logdir))
    app = application.TensorBoardWSGI([plugin.ColoptPlugin(context)], data_provider=provider)
    return Client(app)


@pytest.fixture(scope="module")
def client(dashboard_logs):
    return dashboard_client(dashboard_logs.root)


def get_json(client, url):
    response = client.get(url)
    assert response.status_code == 200, (url, response.get_data(as_text=True))
    assert response.mimetype == "application/json"
    return response.get_json()


def run_data(client, run):
    return get_json(client, f"{PREFIX}/data?run={run}")


# ---------------------------------------------------------------------------- by numpy
def _per_channel_unique(w, axis):
    channels = np.moveaxis(np.asarray(w), axis, 0).reshape(np.asarray(w).shape[axis], -1)
    return max(len(np.unique(c)) for c in channels)


def expected_stats(kernels):
    """{layer: (sparsity, unique per tensor, max unique per output channel)} by numpy."""
    out = {}
    for name, ws in kernels.items():
        zeros = sum(int((w == 0).sum()) for w, _ in ws)
        size = sum(w.size for w, _ in ws)
        per_channel = [_per_channel_unique(w, axis) for w, axis in ws if axis is not None]
        out[name] = (zeros / size, max(len(np.unique(w)) for w, _ in ws),
                     max(per_channel) if per_channel else None)
    return out


def with_axes(snapshot, model):
    """The snapshot's kernels with their channel axes (read from the model's engine)."""
    from keras_colopt import callbacks as cbs

    axes = {name: [axis for _, _, axis in ks]
            for name, ks in cbs.effective_kernels(model).items()}
    return {name: list(zip(ws, axes[name])) for name, ws in snapshot.items()}


# ---------------------------------------------------------------------------- what is written
def test_collaborative_fit_writes_plan_stats_and_invariants_equal_to_the_model(
        dashboard_logs, client):
    logs = dashboard_logs
    d = run_data(client, "run1/colopt")
    assert d["label"] == "run1" and d["layers"] == ["conv", "hidden", "logits"]
    assert d["epochs"] == [0, 1, 2, 3] and d["last_epoch"] == 3 and d["total_epochs"] == 4
    plan = logs.result.plan
    assert [(b["label"], b["start"], b["end"]) for b in d["phases"]] == [
        (p.label, p.start_epoch, p.end_epoch) for p in plan.phases]
    assert [b["label"] for b in d["phases"]] == [
        "Train", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]
    assert all(b["reached"] for b in d["phases"])
    assert d["epoch_phase"] == [p.label for p in plan.phases]

    # Per layer and epoch: exactly what the effective kernels held at that epoch's end.
    for epoch, snapshot in logs.kernels.items():
        want = expected_stats(with_axes(snapshot, logs.result.model))
        for i, name in enumerate(d["layers"]):
            sparsity, unique, per_channel = want[name]
            assert d["metrics"]["sparsity"][i][epoch] == pytest.approx(sparsity), (name, epoch)
            assert d["metrics"]["unique"][i][epoch] == unique, (name, epoch)
            assert d["metrics"]["unique_per_channel"][i][epoch] == per_channel, (name, epoch)
    assert d["weights"] == [sum(w.size for w in logs.kernels[3][n]) for n in d["layers"]]
    # The compression shows: pruned from epoch 1, at most 4 values from epoch 2.
    assert all(d["metrics"]["sparsity"][i][1] >= 0.49 for i in range(3))
    assert all(d["metrics"]["unique_per_channel"][i][2] <= 4 for i in range(3))

    # Invariants: checked at every compression epoch, expectations from the plan, nothing
    # violated, and "found" is what the kernels held.
    inv = d["invariants"]
    assert inv["epochs"] == [1, 2, 3] and inv["violations"] == []
    assert inv["status"] == [[None, "ok", "ok", "ok"]] * 3
    assert inv["checked"] == 9
    for epoch in (1, 2, 3):
        rows = inv["checks"][str(epoch)]
        assert [r["layer"] for r in rows] == d["layers"]
        planned = plan.phases[epoch]
        want = expected_stats(with_axes(logs.kernels[epoch], logs.result.model))
        for r in rows:
            assert r["phase"] == planned.label
            assert r["expected"]["sparsity"] == 0.5
            assert r["expected"]["clusters"] == (None if epoch == 1 else 4)
            assert r["found"]["sparsity"] == pytest.approx(want[r["layer"]][0])
            assert r["found"]["unique"] == want[r["layer"]][1]
            assert r["violations"] == []


def test_the_guard_writes_a_violation_with_nested_layer_names(dashboard_logs, client):
    logs = dashboard_logs
    d = run_data(client, "violation/colopt")
    assert d["layers"] == ["backbone/conv", "backbone/hidden", "logits"]  # model order
    # No plan: each epoch is named by what the model's wrappers do (none here).
    assert [(b["label"], b["start"], b["end"]) for b in d["phases"]] == [("no wrappers", 0, 2)]
    inv = d["invariants"]
    assert inv["status"] == [[None, None], [None, None], ["violation", "violation"]]
    assert [(v["epoch"], v["layer"], v["invariant"]) for v in inv["violations"]] == [
        (0, "logits", "sparsity"), (1, "logits", "sparsity")]
    # What the guard found is the final kernel's real sparsity, and what it raised.
    kernel = logs.nested.get_layer("logits").kernel.numpy()
    (row,) = inv["checks"]["1"]
    assert row["source"] == "InvariantGuard" and row["phase"] is None  # no wrappers, no phase
    assert row["found"]["sparsity"] == pytest.approx(float((kernel == 0).mean()))
    assert row["expected"]["sparsity"] == 0.5
    assert row["violations"][0]["message"] == logs.guard.violations[-1].message()
    assert row["violations"][0]["found"] == logs.guard.violations[-1].found


def test_to_tflite_writes_what_survived_per_layer(dashboard_logs, client):
    logs = dashboard_logs
    (table,) = run_data(client, "run1/colopt")["tflite"]
    assert table["file"] == str(logs.tflite) and table["quantization"] == "int8"
    data = logs.tflite.read_bytes()
    assert table["tflite_bytes"] == len(data)
    deployed = export.read_weights(logs.tflite)
    assert [r["layer"] for r in table["layers"]] == ["conv", "hidden", "logits"]
    assert table["gzip_bytes"] == len(gzip.compress(data, compresslevel=9, mtime=0))
    for r in table["layers"]:
        w = deployed[r["tensor"]]
        assert r["shape"] == list(w.shape) and r["dtype"] == "int8"
        assert r["sparsity"] == pytest.approx(float((w == 0).mean()))
        assert r["unique"] == len(np.unique(w))
        # TFLite stores conv (OHWI) and fully connected (out, in) weights channel first.
        assert r["unique_per_channel"] == _per_channel_unique(w, 0)
        assert r["bytes"] == w.nbytes == math.prod(w.shape)
        assert r["gzip_bytes"] == len(gzip.compress(w.tobytes(), compresslevel=9, mtime=0))
    # The Keras side of the same row: the model's effective kernels at the end.
    want = expected_stats(with_axes(logs.kernels[3], logs.result.model))
    for r in table["layers"]:
        assert r["keras_sparsity"] == pytest.approx(want[r["layer"]][0])
        assert r["keras_unique_per_channel"] == want[r["layer"]][2]
    # The same file on the Ethos-U55-128 (to_tflite(target=...)): Vela's figures, and per
    # operator the Keras layer it computes.
    (on,) = table["targets"]
    again = targets.EthosU("ethos-u55-128").measure(logs.tflite, output_dir=logs.root / "v")
    assert on["target"] == "ethos-u55-128" and on["latency_ms"] == again.latency_ms
    assert on["weight_bytes"] == again.weight_bytes
    assert on["cpu_ops"] == {"Quantize": 1, "Dequantize": 1}  # a float-I/O file
    weighted = [(r["layer"], r["weight_bytes"]) for r in on["layers"] if r["weight_bytes"]]
    assert [layer for layer, _ in weighted] == ["conv", "hidden", "logits"]
    assert sum(b for _, b in weighted) == on["weight_bytes"]


def test_explore_writes_its_leaves_and_each_models_tflite(dashboard_logs, client):
    logs = dashboard_logs
    runs = {r["run"]: r for r in get_json(client, f"{PREFIX}/runs")["runs"]}
    report_run = "explore/logs/report/colopt"
    assert runs[report_run]["label"] == "explore/logs/report"
    d = run_data(client, report_run)
    want = json.loads(logs.report.to_json())
    assert d["leaves"]["chosen"] == logs.report.chosen is not None
    assert [L["name"] for L in d["leaves"]["leaves"]] == ["PTQ", "QAT"]
    for got, exp in zip(d["leaves"]["leaves"], want["leaves"]):
        for key in ("status", "int8_accuracy", "fp32_accuracy", "gzip_bytes", "tflite_bytes",
                    "latency_ms", "accuracy_drop", "meets_targets", "max_unique_per_channel",
                    "target_latency_ms", "target_weight_bytes", "target_cpu_ops"):
            assert got[key] == exp[key], key
        assert got["target_latency_ms"] > 0 and got["target_cpu_ops"] == {}  # int8 in/out
    assert d["leaves"]["targets"] == want["targets"]
    assert d["leaves"]["target"] == "ethos-u55-128"
    assert d["leaves"]["baseline"]["fp32_accuracy"] == want["baseline"]["fp32_accuracy"]
    # The QAT leaf's own run: its epoch, its phase and its .tflite; the baseline's run holds
    # the float file and the post-training leaf made from it.
    qat = run_data(client, "explore/logs/QAT/colopt")
    assert [b["label"] for b in qat["phases"]] == ["QAT"] and qat["epochs"] == [0]
    assert [os.path.basename(t["file"]) for t in qat["tflite"]] == ["qat_int8.tflite"]
    base = run_data(client, "explore/logs/Baseline/colopt")
    assert sorted(os.path.basename(t["file"]) for t in base["tflite"]) == [
        "baseline_float.tflite", "ptq_int8.tflite"]


def test_one_plain_keras3_fit_writes_its_plan_and_checks(digits, tmp_path):
    import keras

    import keras_colopt as colopt
    from keras_colopt import callbacks as cbs
    from conftest import tiny_sequential

    (x, y), _ = digits
    model = tiny_sequential(keras=keras)
    logs = tmp_path / "logs" / "plain"
    co = cbs.CollaborativeOptimization(
        [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=1),
         colopt.Cluster(clusters=4, epochs=1)], log_dir=logs)
    model.fit(x[:128], y[:128], epochs=3, batch_size=64, verbose=0,
              callbacks=[co, cbs.CompressionMetrics(log_dir=logs)])
    d = run_data(dashboard_client(tmp_path / "logs"), "plain/colopt")
    assert [(b["label"], b["start"], b["end"]) for b in d["phases"]] == [
        (p.label, p.start_epoch, p.end_epoch) for p in co.plan.phases]
    assert d["layers"] == ["conv", "hidden", "logits"]
    assert d["invariants"]["epochs"] == [1, 2] and d["invariants"]["violations"] == []
    assert [r["phase"] for r in d["invariants"]["checks"]["2"]] == [co.plan.phases[2].label] * 3
    want = expected_stats(with_axes({n: [np.array(w) for _, w, _ in ks] for n, ks in
                                     cbs.effective_kernels(model).items()}, model))
    for i, name in enumerate(d["layers"]):
        assert d["metrics"]["sparsity"][i][2] == pytest.approx(want[name][0])
        assert d["metrics"]["unique"][i][2] == want[name][1] <= 4


# ---------------------------------------------------------------------------- routes
def test_runs_and_tags_routes(dashboard_logs, client):
    runs = {r["run"]: r for r in get_json(client, f"{PREFIX}/runs")["runs"]}
    assert set(runs) == {"run1/colopt", "violation/colopt", "explore/logs/report/colopt",
                         "explore/logs/QAT/colopt", "explore/logs/Baseline/colopt"}
    assert runs["run1/colopt"]["kinds"] == {"plan": 1, "epoch": 4, "invariants": 3,
                                            "tflite": 1}
    assert runs["run1/colopt"]["last_epoch"] == 3 and runs["run1/colopt"]["updated"] > 0
    tags = get_json(client, f"{PREFIX}/tags?run=run1/colopt")
    assert tags["label"] == "run1"
    assert set(tags["tags"]) == {"plan", "epoch/000000", "epoch/000001", "epoch/000002",
                                 "epoch/000003", "invariants/000001/Prune",
                                 "invariants/000002/Cluster_sparsity-preserving",
                                 "invariants/000003/PCQAT", "tflite/run1_int8.tflite"}
    assert tags["tags"]["epoch/000002"]["kind"] == "epoch"
    assert tags["tags"]["epoch/000002"]["max_step"] == 2
    # Keras' own scalar tags are still written where users read them.
    assert os.listdir(dashboard_logs.run1 / "compression")


def test_tensorboard_lists_the_plugin_as_an_iframe_tab(client):
    listing = get_json(client, "/data/plugins_listing")["keras_colopt"]
    assert listing["enabled"] is True and listing["tab_name"] == "keras_colopt"
    assert listing["loading_mechanism"] == {"type": "IFRAME",
                                            "module_path": f"{PREFIX}/index.js"}


@pytest.mark.parametrize("url, expected", [
    ("/data", "one `run`"),
    ("/data?run=", "one `run`"),
    ("/data?run=run1/colopt&run=violation/colopt", "one `run`"),
    ("/data?run=nope", "No keras_colopt data in run 'nope'"),
    ("/data?run=run1", "No keras_colopt data in run 'run1'"),  # the run's folder, not its data
    ("/data?run=run1/colopt&epoch=3", "Unknown parameter"),
    ("/tags", "one `run`"),
    ("/tags?run=../run1/colopt", "No keras_colopt data"),
    ("/runs?run=run1/colopt", "runs takes no parameters"),
    ("/index.js?v=2", "index.js takes no parameters"),
])
def test_bad_parameters_are_400_with_what_was_expected(client, url, expected):
    response = client.get(PREFIX + url)
    assert response.status_code == 400, url
    text = response.get_data(as_text=True)
    assert expected in text, text
    assert "Expected" in text or "takes no" in text


def test_static_files_and_path_traversal(client):
    js = client.get(f"{PREFIX}/index.js")
    assert js.status_code == 200 and js.mimetype == "text/javascript"
    assert b"export async function render()" in js.data
    css = client.get(f"{PREFIX}/static/style.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert client.get(f"{PREFIX}/static/index.js").data == js.data
    secret = open(plugin.__file__, "rb").read()
    for name in ["../plugin.py", "..%2Fplugin.py", "%2e%2e/plugin.py", "%2e%2e%2fplugin.py",
                 "..\\plugin.py", "static/../../plugin.py", ".hidden.js", "", "plugin.py",
                 "/etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "missing.js",
                 "%00index.js", "index.js%00.css"]:
        response = client.get(f"{PREFIX}/static/{name}")
        assert response.status_code in (400, 404), name
        assert response.data != secret and b"root:" not in response.data, name
    assert client.get(f"{PREFIX}/static/missing.js").status_code == 404


def test_an_empty_log_dir(tmp_path):
    empty = dashboard_client(tmp_path)
    assert get_json(empty, f"{PREFIX}/runs") == {"runs": []}
    assert get_json(empty, "/data/plugins_listing")["keras_colopt"]["enabled"] is False
    response = empty.get(f"{PREFIX}/data?run=run1/colopt")
    assert response.status_code == 400
    assert "Expected one of []" in response.get_data(as_text=True)
    assert empty.get(f"{PREFIX}/index.js").status_code == 200  # the page still loads


# ---------------------------------------------------------------------------- units
def test_write_refuses_an_unknown_tag_and_keeps_numbers_json(tmp_path):
    with pytest.raises(ValueError, match="Unknown dashboard tag 'sparsity/conv'"):
        summary.write(tmp_path, "sparsity/conv", {}, 0)
    summary.write(tmp_path, metadata.epoch_tag(0),
                  {"layers": [{"name": "a", "sparsity": np.float32(0.5), "unique": np.int64(3),
                               "nan": float("nan"), "inf": np.float64("inf")}]}, 0)
    summary.close(tmp_path)
    (doc,) = read_dashboard(tmp_path)["epoch/000000"]
    assert doc["layers"] == [{"name": "a", "sparsity": 0.5, "unique": 3, "nan": None,
                              "inf": None}]
    assert doc["version"] == metadata.VERSION


def test_two_guards_at_one_epoch_both_kept(tmp_path):
    for source in ("PCQAT", "PCQAT"):
        summary.invariants(tmp_path, 3, source, "PCQAT", [], 0.005)
    summary.close(tmp_path)
    assert set(read_dashboard(tmp_path)) == {"invariants/000003/PCQAT",
                                             "invariants/000003/PCQAT~2"}
    assert metadata.kind_of("invariants/000003/PCQAT~2") == "invariants"


def test_assemble_keeps_model_order_and_marks_unreached_phases():
    def layer(name):
        return {"name": name, "size": 4, "sparsity": 0.0, "unique": 4, "unique_per_channel": 2}

    plan = {"phases": [{"label": "Train", "start": 0, "end": 1},
                       {"label": "Prune", "start": 1, "end": 3}], "total_epochs": 3}
    records = {
        "plan": [(0, 1.0, plan)],
        # A layer only an older epoch knows stays after the layer it followed.
        "epoch/000000": [(0, 2.0, {"epoch": 0, "layers": [layer("a"), layer("old"),
                                                           layer("b")]})],
        "epoch/000001": [(1, 3.0, {"epoch": 1, "layers": [layer("a"), layer("b"),
                                                           layer("c")]}),
                         (1, 4.0, {"epoch": 1, "layers": [layer("a"), layer("b"),
                                                           layer("c")]})],
    }
    d = plugin.assemble(records)
    assert d["layers"] == ["a", "old", "b", "c"]
    assert d["epochs"] == [0, 1, 2]  # the planned epoch 2 is on the axis, not reached yet
    assert d["phases"] == [{"label": "Train", "start": 0, "end": 1, "reached": True},
                           {"label": "Prune", "start": 1, "end": 3, "reached": True}]
    assert d["metrics"]["sparsity"][1] == [0.0, None, None]  # "old": epoch 0 only
    assert d["metrics"]["unique"][3] == [None, 4, None]
    assert d["last_epoch"] == 1 and d["total_epochs"] == 3 and d["updated"] == 4.0
    only_plan = plugin.assemble({"plan": [(0, 1.0, plan)]})
    assert [b["reached"] for b in only_plan["phases"]] == [False, False]
    assert plugin.assemble({})["layers"] == []


# ---------------------------------------------------------------------------- packaging
def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        return f.read()


def test_the_entry_point_in_pyproject_names_the_plugin():
    text = _pyproject()
    section = re.search(r'^\[project\.entry-points\."tensorboard_plugins"\]\n(.*?)(?:\n\[|\Z)',
                        text, re.S | re.M)
    assert section, "pyproject.toml has no [project.entry-points.\"tensorboard_plugins\"]"
    (target,) = re.findall(r'^keras_colopt\s*=\s*"([^"]+)"', section.group(1), re.M)
    module, _, name = target.partition(":")
    loaded = getattr(importlib.import_module(module), name)
    assert loaded is plugin.ColoptPlugin
    assert issubclass(loaded, base_plugin.TBPlugin)
    assert loaded.plugin_name == metadata.PLUGIN_NAME == "keras_colopt"
    assert application.make_plugin_loader(loaded)  # TensorBoard accepts it as it loads it


def test_the_static_files_are_package_data():
    text = _pyproject()
    (patterns,) = re.findall(r'^"keras_colopt\.tensorboard"\s*=\s*\[(.*)\]', text, re.M)
    globs = re.findall(r'"([^"]+)"', patterns)
    shipped = {os.path.basename(p) for g in globs
               for p in glob.glob(os.path.join(plugin.STATIC_DIR, "..", g))}
    assert shipped == set(os.listdir(plugin.STATIC_DIR)) == {"index.js", "style.css"}


def test_the_frontend_never_writes_html_and_fetches_nothing_from_elsewhere():
    for name in os.listdir(plugin.STATIC_DIR):
        with open(os.path.join(plugin.STATIC_DIR, name), encoding="utf-8") as f:
            text = f.read()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function", "@import"):
            assert sink not in text, (name, sink)
        urls = set(re.findall(r"https?://[^\s\"')]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
