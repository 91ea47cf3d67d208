"""The demo: the main job on the embedded dataset, shortened."""

import json
import os
import subprocess
import sys

from keras_colopt import cli, export

from test_dashboard import read_dashboard


def test_demo_writes_models_summary_and_logs(tmp_path):
    out = tmp_path / "demo"
    s = cli.run_demo(str(out), train_epochs=2, prune_epochs=2, cluster_epochs=1,
                     quantize_epochs=1, verbose=0)
    for name in ("baseline_int8.tflite", "pcqat_int8.tflite", "summary.md", "summary.json"):
        assert (out / name).is_file(), name
    (run,) = os.listdir(out / "logs")
    assert os.listdir(out / "logs" / run / "compression")
    # The dashboard's data: the plan, every epoch, and both .tflite files' tables.
    tags = read_dashboard(out / "logs" / run)
    assert {"plan", "tflite/baseline_int8.tflite", "tflite/pcqat_int8.tflite"} <= set(tags)
    assert sum(t.startswith("epoch/") for t in tags) == 6
    assert json.loads((out / "summary.json").read_text())["layers"] == s["layers"]
    assert s["phases"] == ["Train", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]
    assert [L["layer"] for L in s["layers"]] == ["conv1", "conv2", "dense1", "logits"]
    for L in s["layers"]:
        # What the demo asked for (50% sparsity, 8 clusters) survives in the .tflite.
        assert L["tflite_sparsity"] >= 0.49, L
        assert L["tflite_unique_per_channel"] <= 8, L
    assert s["size"]["pcqat_int8_gzip_bytes"] < s["size"]["baseline_int8_gzip_bytes"]
    assert 0.0 <= s["accuracy"]["pcqat_int8_tflite"] <= 1.0
    text = (out / "summary.md").read_text()
    assert "| dense1 | 18432 |" in text and "smaller" in text
    # The same two models fully integer, on the Ethos-U55-128 (Vela): nothing on the CPU,
    # the pruned and clustered weights encoded smaller.
    npu = s["ethos_u55_128"]
    assert npu["baseline"]["cpu_ops"] == {} and npu["pcqat"]["cpu_ops"] == {}
    assert npu["pcqat"]["weight_bytes"] < npu["baseline"]["weight_bytes"]
    assert os.path.isfile(npu["pcqat"]["compiled"])
    assert "Ethos-U55-128 latency, Vela estimate" in text


def test_deploy_prints_the_targets_report(tmp_path, capsys):
    import numpy as np
    import tf_keras as keras

    from conftest import tiny_sequential
    from keras_colopt import targets

    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    path = export.to_tflite(tiny_sequential(), tmp_path / "m.tflite", quantization="int8",
                            representative_data=x, io="int8").path
    assert keras  # the tiny model is tf_keras
    assert cli.main(["deploy", path, "--target", "ethos-u85-256", "--json",
                     "--out", str(tmp_path / "vela")]) == 0
    printed = json.loads(capsys.readouterr().out)
    same = targets.EthosU("ethos-u85-256").measure(path, output_dir=tmp_path / "again")
    assert printed["latency_ms"] == same.latency_ms and printed["target"] == "ethos-u85-256"
    assert printed["weight_bytes"] == same.weight_bytes and printed["cpu_ops"] == {}
    assert os.path.isfile(tmp_path / "vela" / "m_vela.tflite")
    assert cli.main(["deploy", path]) == 0  # ethos-u55-128 by default, Markdown
    text = capsys.readouterr().out
    assert "# m.tflite on ethos-u55-128" in text and "| operator | type | on |" in text
    assert os.path.isdir(tmp_path / "m_vela_ethos-u55-128")
    for argv, message in ((["deploy", str(tmp_path / "none.tflite")], "No .tflite file"),
                          (["deploy", path, "--target", "gpu"], "Unknown target 'gpu'"),
                          (["deploy", path, "--target", "ethos-u55-128", "--memory-mode",
                            "Lots"], "Unknown `memory_mode`")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err


def test_layer_of_maps_tflite_names_to_layers():
    names = ["conv1", "conv", "dense1"]
    assert export.layer_of("net/quant_conv1/Conv2D;net/quant_conv1/LastValueQuant/X", names) == "conv1"
    assert export.layer_of("net/conv/Conv2D", names) == "conv"
    assert export.layer_of("net/other/MatMul", names) == ""
    # Keras 3's export scopes each layer as <name>_<n>; nested layers by their own name.
    assert export.layer_of("digits_cnn_1/conv1_1/convolution", names) == "conv1"
    assert export.layer_of("outer_1/backbone_1/conv_1/convolution", ["backbone/conv"]) == \
        "backbone/conv"
    assert export.layer_of("net/conv1x/Conv2D", names) == ""
    # A layer's own name before a path's last component: a DepthwiseConv2D 'dw' next to a
    # SeparableConv2D 'sep', both of whose depthwise operators end in '/depthwise'.
    parts = ["dw", "sep/depthwise", "sep/pointwise"]
    assert export.layer_of("functional_1/dw_1/depthwise", parts) == "dw"
    assert export.layer_of("functional_1/sep_1/depthwise", parts) == "sep/depthwise"


def test_module_entry_point_lists_demo():
    r = subprocess.run([sys.executable, "-m", "keras_colopt", "--help"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"))
    assert r.returncode == 0 and "demo" in r.stdout
    # TensorFlow's import-time native log lines (oneDNN, cudart, cuInit, CPU features) are
    # dropped for the command line, even with TF_CPP_MIN_LOG_LEVEL=0.
    assert "I0000" not in r.stderr and "cuInit" not in r.stderr, r.stderr


NOISY = """
import os, sys
sys.argv[0] = "/somewhere/bin/keras-colopt"
import keras_colopt
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
os.write(2, b"I0000 00:00:1796231166.412492    1952 port.cc:153] oneDNN custom operations are on.\\n")
os.write(2, b"E0000 00:00:1796231168.371849    1952 cuda_platform.cc:52] failed call to cuInit: INTERNAL\\n")
os.write(2, b"E0000 00:00:1796231168.371849    1952 model.cc:7] a real error\\n")
os.write(1, b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: FLOAT32\\n")
os.write(1, b"Epoch 1/2 [=====>    ]\\r")  # a progress update, no newline yet
os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
print("table row", flush=True)
sys.stderr.write("Traceback: ValueError: ours\\n")
"""


def test_the_command_line_drops_native_noise_and_keeps_everything_else():
    r = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, timeout=120,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"Epoch 1/2 [=====>    ]\rtable row\n"
    err = r.stderr.decode()
    assert "a real error" in err and "Traceback: ValueError: ours" in err
    for noise in ("I0000", "cuInit", "absl::InitializeLog", "XNNPACK", "fully_quantize"):
        assert noise not in err, err


def test_dashboard_line_names_the_logs_folder_and_the_tab(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.dashboard_line(str(tmp_path / "colopt-demo" / "logs")) == (
        "Dashboard: tensorboard --logdir colopt-demo/logs  "
        "(then open http://localhost:6006/#keras_colopt)")
    elsewhere = "/some where/logs"  # outside the working folder: as given, quoted
    assert "tensorboard --logdir '/some where/logs'" in cli.dashboard_line(elsewhere)


def test_report_refuses_a_bad_target_before_training(tmp_path, capsys, monkeypatch):
    import keras_colopt as colopt

    def refuse(*args, **kwargs):
        raise AssertionError("explore was called")
    monkeypatch.setattr(colopt, "explore", refuse)
    for argv, message in ((["--target", "ethos-u99"], "Unknown Ethos-U `accelerator`"),
                          (["--memory-mode", "Shared_Sram"], "configure an Ethos-U --target")):
        assert cli.main(["report", "--out", str(tmp_path / "r"), "--quiet", *argv]) == 2
        assert message in capsys.readouterr().err
