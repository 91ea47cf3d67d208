"""PCQAT on the tfmot engine keeps its invariants in the .tflite (issue 24, item 2).

The published keyword-spotting DS-CNN (ARM ML-Zoo / MLPerf Tiny) and MobileNet v1 0.25 (MLPerf
Tiny visual wake words) put an L2 `kernel_regularizer` on every convolution. Through tfmot's
cluster-preserving QAT, whose quantizer writes the clustered kernel into the layer's kernel
variable each step, the regularizer moved that variable after the write: at the compiled rate
the plan `Prune(0.5, 2) -> Cluster(8, 2) -> Quantize(1)` trained to the end, then the guard
raised "clusters expected <= 8 unique values per channel, found 9". The engine now takes those
kernels out of the trained variables (engines/tfmot/quantize.py, freeze_rewritten_kernels).

Here both models are built in tf_keras with L2 (1e-4) on every kernel, trained to convergence
with a decaying rate (cosine to 0) and compiled again at Adam(1e-3), then run through
collaborative_fit at the compiled rate (rate_policy="compiled", the rate that broke), once with
the engine as it was (the kernels left trainable) and once as it is, and with the default rate
policy; every int8 .tflite (or the guard's refusal) is read back: zeros and unique values per output
channel of each clustered kernel, and accuracy in LiteRT.

Run: python benchmarks/tfmot_pcqat_invariants.py [--kws F] [--train 6000] [--smoke]
Writes benchmarks/results/tfmot_pcqat_invariants.{md,json}.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
import origin_tables as ot  # noqa: E402
from keras_colopt.engines.tfmot import quantize  # noqa: E402

real = quantize.freeze_rewritten_kernels


def with_l2(model, l2=1e-4):
    """The model rebuilt with an L2 regularizer on every kernel, as the published ones."""
    def clone(layer):
        cfg = layer.get_config()
        for key in ("kernel_regularizer", "depthwise_regularizer"):
            if key in cfg:
                cfg[key] = keras.regularizers.l2(l2)
        return type(layer).from_config(cfg)
    return keras.models.clone_model(model, clone_function=clone)


def compiled(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy())
    return model


def baseline(name, build, x, y, epochs, batch=64):
    model = with_l2(build())
    steps = epochs * -(-len(x) // batch)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        3e-3, steps)), loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    keras.utils.set_random_seed(0)
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    weights = model.get_weights()
    model = compiled(with_l2(build()), 1e-3)  # handed over at Keras' default
    model.set_weights(weights)
    return model


def check_file(path):
    """(least zeros fraction, most unique values per output channel, kernels) over the
    Conv2D and Dense kernels of an int8 file (those tfmot prunes and clusters)."""
    rows = [w for w in colopt.export.inspect_tflite(path)
            if w.op in ("CONV_2D", "FULLY_CONNECTED")]
    return (min(w.sparsity for w in rows), max(w.unique_per_channel_max for w in rows),
            len(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kws", default=os.path.join(HERE, "out", "kws", "kws_features.npz"))
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    (kx, ky), (kxt, kyt), _ = ot.kws(args.train)
    (fx, fy), (fxt, fyt), _ = ot.fashion_mnist(args.train)
    setups = {"DS-CNN, keywords": (lambda: ot.ds_cnn(0), kx, ky, kxt, kyt),
              "MobileNet v1 0.25, Fashion-MNIST": (lambda: ot.mobilenet(0), fx, fy, fxt, fyt)}
    out = {"rows": [], "train": args.train, "baseline_epochs": args.epochs}
    with tempfile.TemporaryDirectory() as d:
        for name, (build, x, y, xt, yt) in setups.items():
            if args.smoke:
                x, y, xt, yt = x[:256], y[:256], xt[:256], yt[:256]
            base = baseline(name, build, x, y, 1 if args.smoke else args.epochs)
            float_acc = float(base.evaluate(xt, yt, verbose=0)[1])
            print(name, "float", round(float_acc, 4), flush=True)
            for policy, fixed in (("compiled", False), ("compiled", True), (None, True)):
                model = compiled(with_l2(build()), 1e-3)
                model.set_weights(base.get_weights())
                t = time.time()
                row = {"model": name, "float_accuracy": float_acc,
                       "rate_policy": (policy or "default (probe)")
                       + ("" if fixed else ", kernels left trainable (before the fix)")}
                quantize.freeze_rewritten_kernels = real if fixed else (lambda model: [])
                try:
                    r = colopt.collaborative_fit(
                        model, x, y, batch_size=64, verbose=0, rate_policy=policy,
                        phases=[colopt.Prune(0.5, epochs=2), colopt.Cluster(8, epochs=2),
                                colopt.Quantize(epochs=1)])
                    path = os.path.join(d, "m.tflite")
                    colopt.export.to_tflite(r.model, path, quantization="int8",
                                            representative_data=x[:256])
                    sp, uniq, n = check_file(path)
                    row.update(completed=True, int8_accuracy=colopt.export.evaluate_tflite(
                        path, xt, yt), min_sparsity=sp, max_unique_per_channel=uniq,
                        kernels_checked=n)
                except colopt.InvariantViolation as e:
                    row.update(completed=False, error=str(e).splitlines()[1])
                row["seconds"] = round(time.time() - t)
                print(row, flush=True)
                out["rows"].append(row)
    lines = ["# PCQAT on the tfmot engine: invariants in the .tflite (issue 24)", "",
             "Published-style models (L2 1e-4 on every kernel), trained with a cosine decay to "
             "0, compiled again at Adam(1e-3); Prune 50 % (2) -> Cluster 8 (2) -> PCQAT (1) "
             f"through collaborative_fit on the tfmot engine, {args.train} training examples; "
             "the int8 .tflite read back (clustered Conv2D/Dense kernels). Command: "
             f"`{' '.join(['python'] + sys.argv)}`.", "",
             "| model | rate policy | completed | int8 accuracy (float) | min sparsity | "
             "max unique per channel | kernels |", "|---|---|---|---:|---:|---:|---:|"]
    for r in out["rows"]:
        if r["completed"]:
            lines.append(f"| {r['model']} | {r['rate_policy']} | yes | "
                         f"{r['int8_accuracy'] * 100:.2f} ({r['float_accuracy'] * 100:.2f}) | "
                         f"{r['min_sparsity']:.3f} | {r['max_unique_per_channel']} | "
                         f"{r['kernels_checked']} |")
        else:
            lines.append(f"| {r['model']} | {r['rate_policy']} | no: {r['error']} | | | | |")
    text = "\n".join(lines) + "\n"
    out.update(command=" ".join(["python"] + sys.argv),
               machine={"platform": platform.platform(), "cpus": os.cpu_count()})
    results = tempfile.mkdtemp() if args.smoke else os.path.join(HERE, "results")
    with open(os.path.join(results, "tfmot_pcqat_invariants.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(results, "tfmot_pcqat_invariants.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
