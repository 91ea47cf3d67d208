"""Distillation from the float model: PCQAT int8 without and with it, side by side in one run.

For each model/data pair (Keras 3 engine): a float baseline trained until validation accuracy
stops improving (EarlyStopping on a validation split held out of the training data, patience 8,
best weights), then the same compression from it, Prune 50 % (2 epochs) -> sparsity-preserving
Cluster 8 (2) -> PCQAT (1) as in issue 13's measurements, once per setting:

  none          no distillation (the labels only)
  T=t, w=v      collaborative_fit(distill=Distill(temperature=t, weight=v))
  unlabelled    y=None: the frozen float model labels the data (T=4; weight 1 without labels)

Every figure is the int8 `.tflite` run with LiteRT on the test split: accuracy, and top-1
agreement with the float model. Pairs:

  demo       the demo CNN on the embedded digits (1,149 train / 288 validation / 360 test)
  dscnn      DS-CNN on the synthesized keyword set (`--kws F`, benchmarks/kws_data.py --out F)
  mobilenet  MobileNet v1 0.25 on 10,000 Fashion-MNIST images (dataset-fashion-mnist)

Writes benchmarks/results/distill_sweep.{md,json}.

Run: python benchmarks/distill_sweep.py [--pairs demo dscnn] [--kws F] [--seeds 2]
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
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's keras_colopt
sys.path.insert(0, HERE)  # origin_tables, kws_data

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.engines.keras3 import Keras3Engine  # noqa: E402

SETTINGS = [("none", None), ("T=2, w=0.5", dict(temperature=2.0, weight=0.5)),
            ("T=4, w=0.5", dict(temperature=4.0, weight=0.5)),
            ("T=4, w=0.9", dict(temperature=4.0, weight=0.9)),
            ("T=8, w=0.5", dict(temperature=8.0, weight=0.5)),
            ("unlabelled", dict(temperature=4.0, weight=0.5, unlabelled=True))]


def _split(x, y, fraction, seed):
    keep = np.random.default_rng(seed).permutation(len(x))
    n = int(len(x) * fraction)
    return (x[keep[n:]], y[keep[n:]]), (x[keep[:n]], y[keep[:n]])


def pair(name, kws):
    """(model builder(seed), (train, val, test), batch, max baseline epochs, about)."""
    import origin_tables

    def compiled(model, lr=1e-3):
        model.compile(optimizer=keras.optimizers.Adam(lr), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy())
        return model
    if name == "demo":
        (x, y), test = data.load_digits()
        train, val = _split(x, y, 0.2, 0)
        return (Keras3Engine().demo_model, (train, val, test), 32, 200,
                "the demo CNN on the embedded digits")
    if name == "dscnn":
        from kws_data import load_kws

        train, val, test, _ = load_kws(kws)
        return (lambda seed: compiled(origin_tables.ds_cnn(seed, keras=keras)),
                (train, val, test), 64, 100, "DS-CNN on the synthesized keyword set")
    (x, y), test, _ = origin_tables.fashion_mnist(10000)
    train, val = _split(x, y, 0.1, 0)
    return (lambda seed: compiled(origin_tables.mobilenet(seed, keras=keras)),
            (train, val, test), 64, 100, "MobileNet v1 0.25 on 10,000 Fashion-MNIST images")


def phases():
    return [colopt.Prune(sparsity=0.5, epochs=2), colopt.Cluster(clusters=8, epochs=2),
            colopt.Quantize(epochs=1)]


def run_pair(name, kws, seeds):
    build, ((x, y), (xv, yv), (xt, yt)), batch, max_epochs, about = pair(name, kws)
    out = {"about": f"{about}: {len(x)} train / {len(xv)} validation / {len(xt)} test",
           "seeds": []}
    for seed in range(seeds):
        model = build(seed)
        t = time.time()
        stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=8,
                                             restore_best_weights=True)
        h = model.fit(x, y, epochs=max_epochs, batch_size=batch, validation_data=(xv, yv),
                      verbose=0, callbacks=[stop])
        float_pred = np.argmax(model.predict(xt, verbose=0), axis=-1)
        row = {"seed": seed, "baseline_epochs": len(h.epoch), "baseline_s": time.time() - t,
               "fp32_accuracy": float(np.mean(float_pred == yt)), "settings": {}}
        print(name, seed, "baseline", row["baseline_epochs"], "epochs",
              f"{row['fp32_accuracy']:.4f}", flush=True)
        for label, setting in SETTINGS:
            keras.utils.set_random_seed(seed)
            t = time.time()
            setting = dict(setting or {})
            unlabelled = setting.pop("unlabelled", False)
            r = colopt.collaborative_fit(
                model, x, None if unlabelled else y, phases=phases(), batch_size=batch,
                verbose=0, validation_data=(xv, yv),
                distill=colopt.Distill(**setting) if setting else None)
            with tempfile.TemporaryDirectory() as d:
                info = colopt.export.to_tflite(r.model, os.path.join(d, "m.tflite"),
                                               quantization="int8")
                pred = np.argmax(colopt.export.predict_tflite(info.path, xt), axis=-1)
            row["settings"][label] = {"int8_accuracy": float(np.mean(pred == yt)),
                                      "agreement": float(np.mean(pred == float_pred)),
                                      "gzip_bytes": info.gzip_bytes, "seconds": time.time() - t}
            print(name, seed, label, row["settings"][label], flush=True)
            keras.backend.clear_session()
        out["seeds"].append(row)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", nargs="+", default=["demo", "dscnn"],
                    choices=["demo", "dscnn", "mobilenet"])
    ap.add_argument("--kws", help="the keyword set's .npz (benchmarks/kws_data.py --out)")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    results = {name: run_pair(name, args.kws, args.seeds) for name in args.pairs}
    out = {"results": results, "command": " ".join(["python"] + sys.argv),
           "minutes": (time.time() - t0) / 60,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "tensorflow": tf.__version__, "keras": keras.__version__}}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "distill_sweep.json"), "w") as f:
        json.dump(out, f, indent=2)

    lines = ["# PCQAT int8 without and with distillation from the float model", "",
             f"Command: `{out['command']}` ({out['minutes']:.0f} min, {os.cpu_count()} CPUs, "
             f"TensorFlow {tf.__version__}, Keras {keras.__version__}). Keras 3 engine. "
             "Float baseline to EarlyStopping(val_accuracy, patience 8, best weights) on a "
             "validation split of the training data; then Prune 50 % (2) -> Cluster 8 (2) -> "
             "PCQAT (1) from it with each setting; int8 .tflite in LiteRT on the test split. "
             f"Means over {args.seeds} seeds (baseline and compression both seeded); "
             "agreement = top-1 agreement with the float model.", ""]
    for name, res in results.items():
        rows = res["seeds"]
        fp32 = statistics.mean(r["fp32_accuracy"] for r in rows)
        lines += [f"## {name}: {res['about']}", "",
                  f"FP32 baseline {100 * fp32:.2f} % (baseline epochs "
                  f"{', '.join(str(r['baseline_epochs']) for r in rows)}).", "",
                  "| setting | int8 accuracy | vs FP32 | agreement with FP32 | per seed |",
                  "|---|---:|---:|---:|---|"]
        for label, _ in SETTINGS:
            accs = [r["settings"][label]["int8_accuracy"] for r in rows]
            agree = statistics.mean(r["settings"][label]["agreement"] for r in rows)
            lines.append(f"| {label} | {100 * statistics.mean(accs):.2f} % | "
                         f"{100 * (statistics.mean(accs) - fp32):+.2f} pt | {agree:.3f} | "
                         + ", ".join(f"{100 * a:.2f}" for a in accs) + " |")
        lines.append("")
    with open(os.path.join(HERE, "results", "distill_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
