"""The demo: the main job on the embedded dataset, shortened."""

import json
import os
import subprocess
import sys

from keras_colopt import cli


def test_demo_writes_models_summary_and_logs(tmp_path):
    out = tmp_path / "demo"
    s = cli.run_demo(str(out), train_epochs=2, prune_epochs=2, cluster_epochs=1,
                     quantize_epochs=1, verbose=0)
    for name in ("baseline_int8.tflite", "pcqat_int8.tflite", "summary.md", "summary.json"):
        assert (out / name).is_file(), name
    (run,) = os.listdir(out / "logs")
    assert os.listdir(out / "logs" / run / "compression")
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


def test_layer_of_maps_tflite_names_to_layers():
    names = ["conv1", "conv", "dense1"]
    assert cli.layer_of("net/quant_conv1/Conv2D;net/quant_conv1/LastValueQuant/X", names) == "conv1"
    assert cli.layer_of("net/conv/Conv2D", names) == "conv"
    assert cli.layer_of("net/other/MatMul", names) == ""
    # Keras 3's export scopes each layer as <name>_<n>; nested layers by their own name.
    assert cli.layer_of("digits_cnn_1/conv1_1/convolution", names) == "conv1"
    assert cli.layer_of("outer_1/backbone_1/conv_1/convolution", ["backbone/conv"]) == \
        "backbone/conv"
    assert cli.layer_of("net/conv1x/Conv2D", names) == ""


def test_module_entry_point_lists_demo():
    r = subprocess.run([sys.executable, "-m", "keras_colopt", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout
