"""Shared by the examples: the embedded data, a baseline, and the report of the tfmot tutorials
(sparsity and unique values per kernel, int8 .tflite accuracy, gzip size vs the baseline)."""

import logging
import os
import sys
import tempfile

import keras_colopt as colopt
from keras_colopt import data

logging.basicConfig(level=logging.INFO, format="[keras_colopt] %(message)s")
OUT = os.environ.get("COLOPT_EXAMPLES_OUT", tempfile.mkdtemp(prefix="colopt-example-"))
(x, y), (xt, yt) = data.load_digits()


def report(name, model, baseline=None):
    """Prints what the tutorials check by hand; returns the int8 export info."""
    info = colopt.export.to_tflite(model, os.path.join(OUT, f"{name}.tflite"),
                                   quantization="int8", representative_data=x[:256])
    accuracy = colopt.export.evaluate_tflite(info.path, xt, yt)
    weights = colopt.export.inspect_tflite(info.path)
    line = f"\n{name}: int8 .tflite {info.tflite_bytes} B, gzip {info.gzip_bytes} B"
    if baseline is not None:
        line += (f" ({100 * (1 - info.gzip_bytes / baseline.gzip_bytes):.1f}% smaller than the "
                 f"baseline's {baseline.gzip_bytes} B)")
    print(f"{line}; LiteRT accuracy {100 * accuracy:.2f}%")
    for w in weights:
        print(f"  {w.name.split(';')[0]:<34} sparsity {100 * w.sparsity:5.1f}%  "
              f"unique {w.unique:4d}  per channel <= {w.unique_per_channel_max}")
    return info


# Every path runs on a Keras 3 model (the Keras 3 engine); `--tf-keras` runs it on a tf_keras
# model (the tfmot engine), as the tfmot tutorials do.
TF_KERAS = "--tf-keras" in sys.argv[1:]


def baseline(epochs=10, tf_keras=TF_KERAS):
    """A trained baseline (Keras 3; tf_keras with `--tf-keras`) and its int8 (post-training
    quantized) export."""
    if tf_keras:
        from keras_colopt.engines.tfmot import TfmotEngine

        made = TfmotEngine().demo_model()
    else:
        made = data.demo_model()
    model = colopt.collaborative_fit(made, x, y, phases=[colopt.Train(epochs)],
                                     batch_size=32, verbose=0).model
    return model, report("baseline", model)
