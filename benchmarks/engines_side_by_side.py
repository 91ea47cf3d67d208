"""The tfmot engine (tf_keras) and the Keras 3 engine, side by side in one run.

The demo's CNN on the embedded digits, built once per engine from the same seed: a float
baseline trained until validation accuracy stops improving (EarlyStopping, best weights),
then the same collaborative_fit plan (Prune 50% -> sparsity-preserving Cluster 8 -> PCQAT),
exported as int8 `.tflite` from the QAT ranges (no calibration data). Reported per engine:
int8 accuracy in LiteRT, gzip size, what survived per weight tensor, and each phase's
epoch time against a plain float epoch of the same model (median of the epochs after each
fit's first, which traces). The engines alternate A B B A so that a drift of the machine
cancels. Writes benchmarks/results/engines_side_by_side.{md,json}.

`--model dscnn`: the same on DS-CNN (ARM ML-Zoo / MLPerf Tiny KWS: conv, four depthwise-
separable blocks with BatchNormalization and ReLU, Dense softmax) on the synthesized keyword
set (`python benchmarks/kws_data.py --out F` first; `--kws F`), the baseline capped at
`--max-epochs`; its depthwise kernels are compressed in the Keras 3 engine only (tfmot never
prunes or clusters them), which the "what survived" table shows.

`--shared-baseline`: the float baseline is trained once per seed (Keras 3) and both engines
start from its weights, so their results differ by the engine alone (two baselines trained in
two Keras versions differ by more than the engines do); `--also-skip-depthwise` adds a third
row, the Keras 3 engine with depthwise kernels left out of Prune and Cluster as tfmot does.

`--timing` (with `--shared-baseline`): every phase and the float reference run 6 epochs and
each epoch time is the fastest after the first over all runs of an engine, the float reference
also sampled by float fits run between the phases: the cost of a phase on a quiet machine,
robust to other jobs (a median of 1-3 epochs was not); writes ..._timing.{md,json}.

`--model mobilenet`: MobileNet v1 0.25 (keras.applications, weights=None, 32x32x1) on 10,000
Fashion-MNIST training images and the 10,000 test images (Debian's dataset-fashion-mnist),
with the origin tables' phases (Prune 3, Cluster 16 for 3, PCQAT 2 epochs).

Run: python benchmarks/engines_side_by_side.py [--reps 1] [--model demo|dscnn|mobilenet
     --kws F]
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
sys.path.insert(0, HERE)  # origin_tables (DS-CNN, MobileNet, Fashion-MNIST) and kws_data
PHASES = {"demo": lambda: [colopt.Prune(sparsity=0.5, epochs=4),
                           colopt.Cluster(clusters=8, epochs=4), colopt.Quantize(epochs=2)],
          "dscnn": lambda: [colopt.Prune(sparsity=0.5, epochs=4),  # the origin tables' epochs
                            colopt.Cluster(clusters=8, epochs=3), colopt.Quantize(epochs=2)],
          "mobilenet": lambda: [colopt.Prune(sparsity=0.5, epochs=3),  # origin_tables' fashion
                                colopt.Cluster(clusters=16, epochs=3),
                                colopt.Quantize(epochs=2)]}


TIMING_EPOCHS = 6  # --timing: of every phase and of the float reference


def origin_model(which, keras, seed=0):
    """benchmarks/origin_tables.py's DS-CNN or MobileNet, in either Keras, compiled."""
    import origin_tables

    model = (origin_tables.ds_cnn if which == "dscnn" else origin_tables.mobilenet)(
        seed, keras=keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy())
    return model


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


STATISTIC = statistics.median  # --timing: min


class FloatBetweenPhases(Callback):
    """--timing: after each phase's fit, a 3-epoch float fit of the baseline's copy, so that
    the float reference is sampled at the same times as the phases (the machine's load
    drifts); the reference is the fastest of those epochs and of the first float fit's."""

    def __init__(self, engine, which, seed, shared, data_, batch):
        super().__init__()
        self.float_model, _ = build(engine, which, seed)
        self.float_model.set_weights(shared)
        self.data, self.batch, self.clock = data_, batch, EpochClock()

    def on_train_end(self, logs=None):
        (x, y), (xt, yt) = self.data
        self.float_model.fit(x, y, epochs=3, batch_size=self.batch, validation_data=(xt, yt),
                             verbose=0, callbacks=[self.clock])


def _steady(times):
    return STATISTIC(times[1:] if len(times) > 1 else times)


def _not_depthwise(layer):
    return "DepthwiseConv2D" not in type(layer).__name__


def build(engine, which, seed):
    keras = __import__("tf_keras" if engine.name == "tfmot" else "keras")
    model = engine.demo_model(seed) if which == "demo" else origin_model(which, keras, seed)
    return model, keras


def train_baseline(engine, seed, data_, which, max_epochs, batch, fixed):
    """The float model of `engine`'s Keras, trained, and its epoch clock."""
    (x, y), (xt, yt) = data_
    model, keras = build(engine, which, seed)
    clock = EpochClock()
    stop = [] if fixed else [keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=5, restore_best_weights=True)]
    model.fit(x, y, epochs=max_epochs, batch_size=batch, validation_data=(xt, yt), verbose=0,
              callbacks=stop + [clock])
    return model, clock.fits[-1]


def float_epochs(engine, seed, data_, which, batch, epochs=None):
    """A plain float fit of a fresh copy of the model, for the epoch-time reference only."""
    (x, y), (xt, yt) = data_
    epochs = epochs or (TIMING_EPOCHS if STATISTIC is min else 4)
    model, _ = build(engine, which, seed)
    clock = EpochClock()  # with the validation pass the phases' epochs also make
    model.fit(x, y, epochs=epochs, batch_size=batch, validation_data=(xt, yt), verbose=0,
              callbacks=[clock])
    return clock.fits[-1]


def run(engine, seed, data_, which="demo", max_epochs=100, batch=32, skip_depthwise=False,
        fixed=False, shared=None):
    """One engine's pipeline. `shared`: float weights (trained once, in the Keras 3 engine)
    that every engine starts from, so that the engines' results differ by the engine alone
    rather than also by two baselines trained in two Keras versions."""
    (x, y), (xt, yt) = data_
    if shared is None:
        model, times = train_baseline(engine, seed, data_, which, max_epochs, batch, fixed)
        float_epoch, base_epochs = _steady(times), len(times)
    else:
        model, _ = build(engine, which, seed)
        model.set_weights(shared)
        float_epoch, base_epochs = _steady(float_epochs(engine, seed, data_, which, batch)), 0
    with tempfile.TemporaryDirectory() as d:
        base = colopt.export.to_tflite(model, os.path.join(d, "base.tflite"),
                                       quantization="int8", representative_data=x[:256])
        base_acc = colopt.export.evaluate_tflite(base.path, xt, yt)
        clock = EpochClock()
        extra = []
        if STATISTIC is min:  # --timing: float epochs between the phases, at the same times
            reference = FloatBetweenPhases(engine, which, seed, shared, data_, batch)
            extra = [reference]
        t = time.perf_counter()
        phases = PHASES[which]()
        if STATISTIC is min:  # --timing
            for p in phases:
                p.epochs = TIMING_EPOCHS
        if skip_depthwise:  # as tfmot does: Prune and Cluster leave depthwise kernels out
            for p in phases[:2]:
                p.layers = _not_depthwise
        r = colopt.collaborative_fit(model, x, y, phases=phases, batch_size=batch,
                                     validation_data=(xt, yt), verbose=0,
                                     callbacks=[clock] + extra)
        total = time.perf_counter() - t
        if extra:
            float_epoch = min([float_epoch] + [e for f in reference.clock.fits for e in f[1:]])
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
    ap.add_argument("--model", choices=["demo", "dscnn", "mobilenet"], default="demo")
    ap.add_argument("--kws", help="the keyword set's .npz (benchmarks/kws_data.py --out)")
    ap.add_argument("--max-epochs", type=int, default=None,
                    help="cap of the baseline's epochs (default 100 demo, 15 dscnn, "
                         "30 mobilenet)")
    ap.add_argument("--fixed-epochs", action="store_true",
                    help="train the baseline exactly --max-epochs epochs (no EarlyStopping)")
    ap.add_argument("--once", action="store_true",
                    help="each engine once per rep (tfmot keras3) instead of tfmot keras3 "
                         "keras3 tfmot")
    ap.add_argument("--shared-baseline", action="store_true",
                    help="train the float baseline once per rep (Keras 3) and start both "
                         "engines from its weights")
    ap.add_argument("--also-skip-depthwise", action="store_true",
                    help="also run the Keras 3 engine with depthwise kernels left out of "
                         "Prune and Cluster (as tfmot does), a third row")
    ap.add_argument("--keras3-skip-depthwise", action="store_true",
                    help="the Keras 3 engine's Prune and Cluster leave depthwise kernels out")
    ap.add_argument("--timing", action="store_true",
                    help=f"epoch times only: every phase and the float reference run "
                         f"{TIMING_EPOCHS} epochs, and each is the fastest epoch after the "
                         "first (robust to other jobs on the machine); needs "
                         "--shared-baseline. The accuracies are not the plan's")
    args = ap.parse_args()
    if args.timing and not args.shared_baseline:
        ap.error("--timing needs --shared-baseline (the float reference epoch)")
    if args.timing:
        global STATISTIC
        STATISTIC = min
    if args.model == "demo":
        data_, batch, what = data.load_digits(), 32, "the demo CNN on digits"
    elif args.model == "mobilenet":
        from origin_tables import fashion_mnist

        (x, y), (xt, yt), about = fashion_mnist(10000)
        data_, batch, what = ((x, y), (xt, yt)), 64, "MobileNet v1 0.25 on " + about["dataset"]
    else:
        from kws_data import load_kws

        (x, y), _, (xt, yt), _ = load_kws(args.kws)
        data_, batch = ((x, y), (xt, yt)), 64
        what = f"DS-CNN on the synthesized keywords ({len(x)} train / {len(xt)} test clips)"
    max_epochs = args.max_epochs or {"demo": 100, "dscnn": 15, "mobilenet": 30}[args.model]
    skip_dw = "keras3 (depthwise left out)"
    results = {"tfmot": [], "keras3": []}
    if args.also_skip_depthwise:
        results[skip_dw] = []
    for rep in range(args.reps):
        order = ((TfmotEngine(), Keras3Engine()) if args.once else
                 (TfmotEngine(), Keras3Engine(), Keras3Engine(), TfmotEngine()))
        shared = None
        if args.shared_baseline:
            shared = train_baseline(Keras3Engine(), rep, data_, args.model, max_epochs, batch,
                                    args.fixed_epochs)[0].get_weights()
        runs = [(e.name, e, args.keras3_skip_depthwise and e.name == "keras3") for e in order]
        if args.also_skip_depthwise:
            runs.append((skip_dw, Keras3Engine(), True))
        for name, engine, skip in runs:
            results[name].append(run(engine, rep, data_, args.model, max_epochs, batch,
                                     skip_depthwise=skip, fixed=args.fixed_epochs,
                                     shared=shared))
            print(name, {k: v for k, v in results[name][-1].items() if k != "survived"},
                  flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = {"results": results, "command": " ".join(["python"] + sys.argv),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "tensorflow": tf.__version__}}
    stem = "engines_side_by_side" + ("" if args.model == "demo" else "_" + args.model) \
        + ("_keras3_skip_depthwise" if args.keras3_skip_depthwise else "") \
        + ("_three" if args.also_skip_depthwise else "") \
        + ("_fixed" if args.fixed_epochs else "") \
        + ("_shared" if args.shared_baseline else "") + ("_timing" if args.timing else "")
    with open(os.path.join(HERE, "results", stem + ".json"), "w") as f:
        json.dump(out, f, indent=2)

    def mean(name, key):
        return statistics.mean(r[key] for r in results[name])
    def spread(name, key):
        v = [r[key] for r in results[name]]
        return f" ({min(v):.4f}-{max(v):.4f})" if len(v) > 1 else ""
    labels = list(results["tfmot"][0]["phase_epoch_s"])
    phases = " -> ".join(f"{type(p).__name__} ({TIMING_EPOCHS if args.timing else p.epochs})"
                         for p in PHASES[args.model]())
    lines = [f"# tfmot engine vs Keras 3 engine: {what}", "",
             f"Command: `{out['command']}`; {os.cpu_count()} CPUs, TensorFlow {tf.__version__}. "
             + (f"Float baseline trained {max_epochs} epochs, " if args.fixed_epochs else
                "Float baseline trained to EarlyStopping(val_accuracy, patience 5, best "
                f"weights; at most {max_epochs} epochs), ")
             + ("once per rep in Keras 3, and both engines start from its weights (copied "
                "into the tf_keras model of the same architecture; each engine's float epoch "
                "is timed on a fresh copy), " if args.shared_baseline else "")
             + ("**timing run**: every epoch time is the fastest epoch after the first of its "
                f"fit ({TIMING_EPOCHS} epochs each), over all runs of the engine; the float "
                "reference also samples 3-epoch float fits run after each phase (the load of "
                "the machine drifts); the accuracies are of this longer plan; "
                if args.timing else "")
             + f"batch {batch}; then {phases} (Prune 50%, "
             f"Cluster {PHASES[args.model]()[1].clusters} sparsity-preserving, then PCQAT), "
             "exported as int8 from the QAT ranges "
             "(the float baseline: "
             "post-training int8, 256 training images); order "
             + ("tfmot keras3" if args.once else "tfmot keras3 keras3 tfmot")
             + f" per rep, means over {len(results['tfmot'])} run(s) per engine "
             f"(seeds 0..{args.reps - 1}).", "",
             "| engine | float int8 acc | optimized int8 acc | float gzip | optimized gzip | "
             "optimized weights gzip | float epoch | "
             + " | ".join(f"{lab} epoch (x float)" for lab in labels) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(labels)]
    over_runs = min if args.timing else statistics.mean  # timing: the fastest run's epoch
    for name in results:
        fe = over_runs(r["float_epoch_s"] for r in results[name])
        cells = []
        for lab in labels:
            pe = over_runs(r["phase_epoch_s"][lab] for r in results[name])
            cells.append(f"{pe * 1e3:.0f} ms ({pe / fe:.2f}x)")
        lines.append(f"| {name} | {mean(name, 'float_int8_accuracy'):.4f} | "
                     f"{mean(name, 'int8_accuracy'):.4f}{spread(name, 'int8_accuracy')} | "
                     f"{mean(name, 'float_int8_gzip'):.0f} B | "
                     f"{mean(name, 'gzip_bytes'):.0f} B | {mean(name, 'weights_gzip_bytes'):.0f} B | "
                     f"{fe * 1e3:.0f} ms | "
                     + " | ".join(cells) + " |")
    if args.once:  # one run per engine per seed: the per-seed difference is paired
        for name in [n for n in results if n != "tfmot"]:
            diffs = [k["int8_accuracy"] - t["int8_accuracy"]
                     for t, k in zip(results["tfmot"], results[name])]
            lines += ["", f"Optimized int8 accuracy, {name} minus tfmot, per seed: "
                      + ", ".join(f"{d * 100:+.2f}" for d in diffs)
                      + f" points (mean {statistics.mean(diffs) * 100:+.2f})."]
    lines += ["", "What survived in the int8 file (first run of each engine):", "",
              "| engine | tensor | sparsity | values per channel (max) |", "|---|---|---:|---:|"]
    for name in results:
        for w in results[name][0]["survived"]:
            lines.append(f"| {name} | {w['name']} | {w['sparsity']:.3f} | "
                         f"{w['unique_per_channel_max']} |")
    with open(os.path.join(HERE, "results", stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
