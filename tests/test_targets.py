"""Fully integer files (`io="int8"`) and deployment targets: Ethos-U through Vela, LiteRT CPU."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import keras_colopt as colopt
from keras_colopt import export, targets

from conftest import compile_, tiny_sequential

# Operators a dynamic batch axis (Flatten) or float I/O leave in a file: an NPU runs none.
_NOT_MODEL_OPS = {"SHAPE", "STRIDED_SLICE", "PACK", "QUANTIZE", "DEQUANTIZE"}


def _k3_model():
    import keras

    keras.utils.set_random_seed(0)
    return compile_(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits")]), keras=keras)


def _ops(path):
    return set(export.operators(path))


@pytest.fixture(scope="module", params=["tfmot", "tfmot-qat", "keras3", "keras3-qat"])
def files(request, digits, tmp_path_factory):
    """The same trained model exported with float and with int8 input/output."""
    (x, y), _ = digits
    model = tiny_sequential() if request.param.startswith("tfmot") else _k3_model()
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    if request.param.endswith("-qat"):
        model = colopt.collaborative_fit(model, x, y, phases=[colopt.Quantize(epochs=1)],
                                         batch_size=64, verbose=0, rate_policy="compiled").model
    folder = tmp_path_factory.mktemp(request.param)
    kw = dict(quantization="int8", representative_data=x[:64])
    return (export.to_tflite(model, folder / "float_io.tflite", **kw),
            export.to_tflite(model, folder / "int8_io.tflite", io="int8", **kw))


def test_int8_io_file_is_fully_integer_with_a_static_batch(files):
    float_io, int8_io = files
    it = Interpreter(model_path=int8_io.path)
    it.allocate_tensors()
    (i,), (o,) = it.get_input_details(), it.get_output_details()
    assert i["dtype"] == np.int8 and o["dtype"] == np.int8
    assert list(i["shape_signature"]) == [1, 8, 8, 1] and list(o["shape_signature"]) == [1, 10]
    # The scale and zero point ExportInfo gives are the file's own.
    (name, tin), = int8_io.inputs.items()
    (_, tout), = int8_io.outputs.items()
    assert (tin.scale, tin.zero_point) == pytest.approx(i["quantization"])
    assert (tout.scale, tout.zero_point) == pytest.approx(o["quantization"])
    assert export.inspect_tflite(int8_io.path).inputs[name] == tin
    assert int8_io.io == "int8" and float_io.io == "float32"
    assert not _ops(int8_io.path) & _NOT_MODEL_OPS
    assert {"QUANTIZE", "DEQUANTIZE"} <= _ops(float_io.path)  # what io="int8" removes
    # ... and nothing but the model's own operators, all on the NPU.
    report = targets.EthosU("ethos-u55-128").measure(int8_io.path)
    assert report.cpu_ops == {} and report.npu_ops >= 3


def test_int8_io_file_is_evaluated_like_the_float_io_one(files, digits):
    """predict_tflite quantizes the input and dequantizes the output with the file's own
    parameters, saturating out-of-range inputs as the float-I/O file's QUANTIZE op does."""
    float_io, int8_io = files
    _, (xt, yt) = digits
    for x in (xt, 3.0 * xt - 1.0):  # the second: half the pixels outside the input's range
        a = export.predict_tflite(float_io.path, x)
        b = export.predict_tflite(int8_io.path, x)
        assert b.shape == a.shape == (len(x), 10)
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert export.evaluate_tflite(int8_io.path, xt, yt) == export.evaluate_tflite(
        float_io.path, xt, yt)


def test_io_int8_needs_int8_quantization(digits, tmp_path):
    with pytest.raises(ValueError, match="io='int8' makes a fully integer file"):
        export.to_tflite(tiny_sequential(), tmp_path / "m.tflite", quantization="float16",
                         io="int8")
    with pytest.raises(ValueError, match="Unknown `io`"):
        export.to_tflite(tiny_sequential(), tmp_path / "m.tflite", io="uint8")
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize("accelerator", ["ethos-u55-128", "ethos-u65-256", "ethos-u85-256"])
def test_ethos_u_report_equals_velas_own_summary(files, tmp_path, accelerator):
    """The same file and settings compiled by Vela's own command line: our report holds its
    summary's figures, and the per-operator encoded weights add up to its total."""
    _, int8_io = files
    target = targets.EthosU(accelerator)
    report = target.measure(int8_io.path, output_dir=tmp_path / "ours")
    out = tmp_path / "vela"
    subprocess.run([sys.executable, "-m", "ethosu.vela", int8_io.path, "--accelerator-config",
                    accelerator, "--config", targets._config_file(), "--system-config",
                    target.system_config, "--memory-mode", target.memory_mode,
                    "--output-dir", str(out)], check=True, capture_output=True)
    (summary,) = [f for f in os.listdir(out) if "_summary_" in f]
    with open(out / summary) as f:
        s = next(csv.DictReader(f))
    assert report.latency_ms == pytest.approx(float(s["inference_time"]) * 1e3)
    assert report.weight_bytes == int(float(s["total_npu_encoded_weights"]))
    assert report.original_weight_bytes == int(float(s["total_original_weights"]))
    assert report.cycles == int(float(s["cycles_total"]))
    assert report.sram_bytes == round(float(s["sram_memory_used"]) * 1024)
    assert (report.system_config, report.memory_mode) == (s["system_config"], s["memory_mode"])
    assert sum(c.weight_bytes or 0 for c in report.layers) == report.weight_bytes
    assert {c.operator for c in report.layers if c.weight_bytes} == {"Conv2D", "FullyConnected"}
    assert os.path.exists(report.compiled) and report.compiled.endswith("int8_io_vela.tflite")


def test_float_io_int8_file_lists_its_cpu_operators(files):
    float_io, _ = files
    report = targets.EthosU().measure(float_io.path)
    assert report.cpu_ops.get("Quantize") == 1 and report.cpu_ops.get("Dequantize") == 1
    assert os.path.dirname(report.output_dir) == os.path.dirname(float_io.path)


def test_ethos_u_refuses_what_it_cannot_take(digits, tmp_path):
    (x, _), _ = digits
    with pytest.raises(ValueError, match="Unknown Ethos-U `accelerator`.*ethos-u55-128"):
        targets.EthosU("ethos-u99")
    with pytest.raises(ValueError, match="Unknown `system_config` for ethos-u55-128.*"
                                         "Ethos_U55_High_End_Embedded"):
        targets.EthosU("ethos-u55-128", system_config="Ethos_U85_SYS_DRAM_Mid")
    with pytest.raises(ValueError, match="Unknown `memory_mode`"):
        targets.EthosU("ethos-u65-256", memory_mode="Lots")
    float_file = export.to_tflite(tiny_sequential(), tmp_path / "f.tflite", quantization="none")
    with pytest.raises(targets.TargetError, match="not an integer file.*io='int8'"):
        targets.EthosU().measure(float_file.path)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(targets.TargetError, match="junk.tflite"):
        targets.EthosU().measure(junk)
    with pytest.raises(ValueError, match="Unknown target 'gpu'"):
        targets.get("gpu")


def test_litert_cpu_measures_latency_and_stored_weights(files):
    _, int8_io = files
    report = targets.LiteRTCPU(threads=1, runs=5).measure(int8_io.path)
    assert report.latency_ms > 0
    assert report.weight_bytes == sum(w.nbytes for w in export.read_weights(
        int8_io.path).values())
    assert "FULLY_CONNECTED" in report.cpu_ops and report.npu_ops == 0


def test_explore_on_ethos_u_picks_a_leaf_whose_vela_latency_meets_the_target(digits, tmp_path):
    """Every leaf exported fully integer and compiled by Vela; the latency target applies to
    Vela's estimate. Run once without targets, then the same call with a latency target
    between the two leaves' (the leaves are reused from the first call's state: no training)."""
    (x, y), (xt, yt) = digits
    kw = dict(validation_data=(xt, yt), out_dir=tmp_path / "tree", baseline_epochs=1,
              leaves=["PTQ", "Pruned+PTQ"], prune=colopt.Prune(0.75, epochs=1), batch_size=64,
              latency_runs=2, rate_policy="compiled",
              target=targets.EthosU("ethos-u55-128"))
    first = colopt.explore(tiny_sequential(), x, y, **kw)
    ptq, pruned = first.leaf("PTQ"), first.leaf("Pruned+PTQ")
    assert pruned.target_weight_bytes < ptq.target_weight_bytes
    assert pruned.target_latency_ms < ptq.target_latency_ms, "the premise: pruning is faster"
    assert ptq.target_cpu_ops == {} and first.target == "ethos-u55-128"
    limit = (ptq.target_latency_ms + pruned.target_latency_ms) / 2
    report = colopt.explore(tiny_sequential(), x, y, max_latency_ms=limit, **kw)
    assert report.epochs_run == 0 and all(r.reused for r in report.leaves)
    assert report.chosen == "Pruned+PTQ"
    again = targets.EthosU("ethos-u55-128").measure(report.leaf("Pruned+PTQ").tflite,
                                                     output_dir=tmp_path / "check")
    assert again.latency_ms <= limit < targets.EthosU("ethos-u55-128").measure(
        report.leaf("PTQ").tflite, output_dir=tmp_path / "check2").latency_ms
    md = report.to_markdown()
    assert "## On ethos-u55-128" in md and "latency on ethos-u55-128 ≤" in md
    with pytest.raises(ValueError, match="`target` must be a deployment target"):
        colopt.explore(tiny_sequential(), x, y, **dict(kw, target="ethos-u55-128"))
