"""The tfmot engine (tf_keras) and the Keras 3 engine, side by side in one run.

The demo's CNN on the embedded digits, built once per engine from the same seed: a float
baseline trained until validation accuracy stops improving (EarlyStopping, best weights),
then the same collaborative_fit plan (Prune 50% -> sparsity-preserving Cluster 8 -> PCQAT),
exported as int8 `.tflite` from the QAT ranges (no calibration data). Reported per engine:
int8 accuracy in LiteRT, gzip size, what survived per weight tensor, and each phase's
epoch time against a plain float epoch of the same model (median of the epochs after each
fit's first, which traces). The engines alternate A B B A so that a drift of the machine
cancels. Writes benchmarks/results/engines_side_by_side.{md,json}.

Run: python benchmarks/engines_side_by_side.py [--reps 1]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.engines.base import Callback  # noqa: E402
from keras_colopt.engines.keras3 import Keras3Engine  # noqa: E402
from keras_colopt.engines.tfmot import TfmotEngine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = lambda: [colopt.Prune(sparsity=0.5, epochs=4),  # noqa: E731
                  colopt.Cluster(clusters=8, epochs=4),
                  colopt.Quantize(epochs=2)]


class EpochClock(Callback):
    """Epoch wall times, grouped by fit() call (one per phase in collaborative_fit)."""

    def __init__(self):
        super().__init__()
        self.fits, self._t = [], None

    def on_train_begin(self, logs=None):
        self.fits.append([])

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.fits[-1].append(time.perf_counter() - self._t)


def _steady(times):
    return statistics.median(times[1:] if len(times) > 1 else times)


def run(engine, seed, data_):
    (x, y), (xt, yt) = data_
    keras = __import__("tf_keras" if engine.name == "tfmot" else "keras")
    model = engine.demo_model(seed)
    clock = EpochClock()
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=5,
                                         restore_best_weights=True)
    model.fit(x, y, epochs=100, batch_size=32, validation_data=(xt, yt), verbose=0,
              callbacks=[stop, clock])
    float_epoch = _steady(clock.fits[-1])
    base_epochs = len(clock.fits[-1])
    with tempfile.TemporaryDirectory() as d:
        base = colopt.export.to_tflite(model, os.path.join(d, "base.tflite"),
                                       quantization="int8", representative_data=x[:256])
        base_acc = colopt.export.evaluate_tflite(base.path, xt, yt)
        clock = EpochClock()
        t = time.perf_counter()
        r = colopt.collaborative_fit(model, x, y, phases=PHASES(), batch_size=32,
                                     validation_data=(xt, yt), verbose=0, callbacks=[clock])
        total = time.perf_counter() - t
        info = colopt.export.to_tflite(r.model, os.path.join(d, "opt.tflite"),
                                       quantization="int8")
        acc = colopt.export.evaluate_tflite(info.path, xt, yt)
        weights_gzip = colopt.export.gzip_size(b"".join(
            a.tobytes() for a in colopt.export.read_weights(info.path).values()))
        survived = [{"name": w.name, "sparsity": w.sparsity,
                     "unique_per_channel_max": w.unique_per_channel_max}
                    for w in colopt.export.inspect_tflite(info.path)]
    labels = [p.label for p in r.plan]
    return {"engine": engine.name, "baseline_epochs": base_epochs,
            "float_int8_accuracy": base_acc, "float_int8_gzip": base.gzip_bytes,
            "int8_accuracy": acc, "gzip_bytes": info.gzip_bytes, "weights_gzip_bytes": weights_gzip,
            "run_s": total,
            "float_epoch_s": float_epoch,
            "phase_epoch_s": {lab: _steady(f) for lab, f in zip(labels, clock.fits)},
            "survived": survived}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    data_ = data.load_digits()
    results = {"tfmot": [], "keras3": []}
    for rep in range(args.reps):
        for engine in (TfmotEngine(), Keras3Engine(), Keras3Engine(), TfmotEngine()):
            results[engine.name].append(run(engine, rep, data_))
            print(engine.name, {k: v for k, v in results[engine.name][-1].items()
                                if k != "survived"}, flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = {"results": results, "command": " ".join(["python"] + sys.argv),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "tensorflow": tf.__version__}}
    with open(os.path.join(HERE, "results", "engines_side_by_side.json"), "w") as f:
        json.dump(out, f, indent=2)

    def mean(name, key):
        return statistics.mean(r[key] for r in results[name])
    labels = list(results["tfmot"][0]["phase_epoch_s"])
    lines = ["# tfmot engine vs Keras 3 engine: the demo CNN on digits", "",
             f"Command: `{out['command']}`; {os.cpu_count()} CPUs, TensorFlow {tf.__version__}. "
             "Float baseline trained to EarlyStopping(val_accuracy, patience 5, best weights); "
             "then Prune 50% (4 epochs) -> Cluster 8 sparsity-preserving (4 epochs) -> PCQAT "
             "(2 epochs), exported as int8 from the QAT ranges (the float baseline: "
             "post-training int8, 256 training images); order tfmot "
             "keras3 keras3 tfmot per rep, means over "
             f"{2 * args.reps} runs per engine (seeds 0..{args.reps - 1}).", "",
             "| engine | float int8 acc | optimized int8 acc | float gzip | optimized gzip | "
             "optimized weights gzip | float epoch | "
             + " | ".join(f"{lab} epoch (x float)" for lab in labels) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(labels)]
    for name in ("tfmot", "keras3"):
        fe = mean(name, "float_epoch_s")
        cells = [f"{statistics.mean(r['phase_epoch_s'][lab] for r in results[name]) * 1e3:.0f}"
                 f" ms ({statistics.mean(r['phase_epoch_s'][lab] for r in results[name]) / fe:.2f}x)"
                 for lab in labels]
        lines.append(f"| {name} | {mean(name, 'float_int8_accuracy'):.4f} | "
                     f"{mean(name, 'int8_accuracy'):.4f} | {mean(name, 'float_int8_gzip'):.0f} B | "
                     f"{mean(name, 'gzip_bytes'):.0f} B | {mean(name, 'weights_gzip_bytes'):.0f} B | "
                     f"{fe * 1e3:.0f} ms | "
                     + " | ".join(cells) + " |")
    lines += ["", "What survived in the int8 file (first run of each engine):", "",
              "| engine | tensor | sparsity | values per channel (max) |", "|---|---|---:|---:|"]
    for name in ("tfmot", "keras3"):
        for w in results[name][0]["survived"]:
            lines.append(f"| {name} | {w['name']} | {w['sparsity']:.3f} | "
                         f"{w['unique_per_channel_max']} |")
    with open(os.path.join(HERE, "results", "engines_side_by_side.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
