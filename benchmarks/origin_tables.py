"""The origin document's results tables, at small scale, with keras_colopt's public API,
next to the same pipelines hand-written with tfmot (as its tutorials do).

Two experiments (the origin's data cannot be downloaded here):
  fashion  MobileNet v1 (alpha 0.25, 32x32x1 input, tf_keras.applications, weights=None) on
           Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; MIT).
  kws      DS-CNN (the ARM ML-Zoo / MLPerf Tiny architecture) on 49x10 MFCCs of a
           synthesized Speech-Commands-like set (python benchmarks/kws_data.py first).

For each: a baseline is trained once; `colopt.explore` builds every leaf of the deployment
tree from it (PTQ, Pruned+PTQ, QAT, PQAT, Clustered+PTQ, CQAT, SparseClustered+PTQ, PCQAT),
again with per-channel clustering (Clustered+PTQ, CQAT), and PCQAT's path is also run without
preservation (Quantize(preserve="none")). Every accuracy is the int8 .tflite run with LiteRT
on the test split. Then the PCQAT path (Prune -> Cluster -> Quantize, same epochs) is timed
hand-written with tfmot (A), with collaborative_fit without its callbacks (B) and with them
(C), alternating A B C C B A. Writes benchmarks/results/origin_<experiment>.{md,json}.

`--engine keras3`: the same tables with the models built in Keras 3 (`import keras`),
through the Keras 3 engine (no hand-written tfmot timing: tfmot has no Keras 3); writes
origin_<experiment>_keras3.{md,json}.

`--converged`: the baseline trains until its validation accuracy stops improving
(EarlyStopping, patience 5, best weights; the validation split is 10 % of the training data,
never the test split) instead of a fixed number of epochs, so that a leaf above FP32 shows a
baseline that was not done rather than compression that helps; the baseline is kept in
benchmarks/out/ so that `--distill` starts from the very same one. `--distill`: every
compression phase distils from the baseline (`explore(..., distill=True)`). Both add to the
output's name (origin_<experiment>[_keras3][_converged][_distill]).

Run: python benchmarks/origin_tables.py fashion [--train 10000] [--reps 1]
     python benchmarks/origin_tables.py kws
     python benchmarks/origin_tables.py fashion --engine keras3 --reps 0
     python benchmarks/origin_tables.py fashion --engine keras3 --reps 0 --converged [--distill]
"""

import argparse
import gc
import glob
import gzip
import json
import os
import platform
import resource
import statistics
import sys
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")

# Origin's headline figures (Arm's collaborative-optimization guide), for the table.
ORIGIN = {
    "PQAT": "DS-CNN-L: INT8 94.13% vs 93.80% pruned+PTQ vs 95.23% FP32; gzip -40.63%",
    "CQAT": "MobileNet v1 CIFAR-10: INT8 94.52% vs 94.41% clustered+PTQ vs 94.88% FP32",
    "per-channel CQAT": "DS-CNN-L: 95.95% per tensor -> 96.44% per channel",
    "PCQAT": "DS-CNN-L (50% sparsity, 8 clusters): INT8 94.06% vs 93.21% without preservation",
}


# --------------------------------------------------------------------------- data

def _idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(n_train, seed=0):
    """Debian's dataset-fashion-mnist (60k/10k), padded to 32x32, scaled to [0, 1]."""
    files = {}
    for pattern in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        hits = sorted(glob.glob(f"/usr/share/datasets/fashion-mnist/{pattern}*")
                      or glob.glob(f"/usr/share/**/*{pattern}*", recursive=True))
        if not hits:
            sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist "
                     "(dpkg -L dataset-fashion-mnist lists its idx files).")
        files[pattern] = hits[0]

    def prep(images):
        x = np.pad(images.astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))
        return x[..., None]

    x, y = prep(_idx(files["train-images"])), _idx(files["train-labels"]).astype(np.int64)
    xt, yt = prep(_idx(files["t10k-images"])), _idx(files["t10k-labels"]).astype(np.int64)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(x))[:n_train]
    return (x[keep], y[keep]), (xt, yt), {
        "dataset": f"Fashion-MNIST (Debian dataset-fashion-mnist): {n_train} of 60,000 "
                   "training images (random, seed 0), all 10,000 test images, padded to 32x32"}


def kws(n_train, seed=0):
    path = os.path.join(OUT, "kws", "kws_features.npz")
    if not os.path.exists(path):
        sys.exit(f"{path} not found: run python benchmarks/kws_data.py first.")
    with np.load(path) as f:
        x, y, xt, yt = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    if n_train and n_train < len(x):
        keep = np.random.default_rng(seed).permutation(len(x))[:n_train]
        x, y = x[keep], y[keep]
    return (x, y), (xt, yt), {
        "dataset": f"synthesized Speech-Commands-like keywords (benchmarks/kws_data.py): "
                   f"{len(x)} training / {len(xt)} test clips, test voices unseen in training"}


# --------------------------------------------------------------------------- models

def mobilenet(seed=0, keras=keras):
    """MobileNet v1 0.25 for 32x32x1 (in tf_keras, or the Keras module given)."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNet(input_shape=(32, 32, 1), alpha=0.25, weights=None,
                                         classes=10, dropout=1e-3)
    return model


def ds_cnn(seed=0, classes=12, filters=64, keras=keras):
    """DS-CNN as in ARM ML-Zoo / MLPerf Tiny KWS: conv 10x4/2, four depthwise-separable
    blocks, average pool, dense (in tf_keras, or the Keras module given)."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    i = keras.Input((49, 10, 1))
    h = L.Conv2D(filters, (10, 4), strides=(2, 2), padding="same", use_bias=False)(i)
    h = L.ReLU()(L.BatchNormalization()(h))
    h = L.Dropout(0.2)(h)
    for _ in range(4):
        h = L.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
        h = L.ReLU()(L.BatchNormalization()(h))
        h = L.Conv2D(filters, 1, use_bias=False)(h)
        h = L.ReLU()(L.BatchNormalization()(h))
    h = L.Dropout(0.4)(h)
    h = L.GlobalAveragePooling2D()(h)
    o = L.Dense(classes, activation="softmax")(h)
    return keras.Model(i, o, name="ds_cnn")


def mbv2_block(x, expand, out, stride, name, bn, keras=keras):
    """One MobileNetV2 inverted-residual block (1x1 expand, ReLU6, ZeroPadding2D before a
    strided 3x3 depthwise, ReLU6, 1x1 project, Add when the shape stays), a BN after every
    conv made by `bn(tensor, name)` (in tf_keras, or the Keras module given)."""
    c = x.shape[-1]
    h = x
    if expand != 1:
        h = keras.layers.Conv2D(c * expand, 1, use_bias=False, name=f"{name}_expand")(h)
        h = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(bn(h, f"{name}_expand_bn"))
    if stride == 2:
        h = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_pad")(h)
    h = keras.layers.DepthwiseConv2D(3, strides=stride, use_bias=False,
                                     padding="same" if stride == 1 else "valid",
                                     name=f"{name}_depthwise")(h)
    h = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(bn(h, f"{name}_depthwise_bn"))
    h = keras.layers.Conv2D(out, 1, use_bias=False, name=f"{name}_project")(h)
    h = bn(h, f"{name}_project_bn")
    if stride == 1 and c == out:
        h = keras.layers.Add(name=f"{name}_add")([x, h])
    return h


EXPERIMENTS = {
    "fashion": {"data": fashion_mnist, "model": mobilenet, "train": 10000, "batch": 64,
                "baseline_epochs": 12, "lr": 1e-3, "prune_epochs": 3, "cluster_epochs": 3,
                "qat_epochs": 2, "clusters": 16},
    "kws": {"data": kws, "model": ds_cnn, "train": None, "batch": 64, "baseline_epochs": 15,
            "lr": 1e-3, "prune_epochs": 4, "cluster_epochs": 3, "qat_epochs": 2,
            "clusters": 8},
}


def compiled(model, lr, keras=keras, from_logits=False):
    model.compile(optimizer=keras.optimizers.Adam(lr), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
    return model


def fit_converged(model, x, y, batch, max_epochs, seed=0, keras=keras, verbose=0,
                  plateau=False) -> int:
    """Trains the compiled `model` until its validation accuracy stops improving
    (EarlyStopping, patience 5, best weights restored) on a 10 % split held out of the
    training data (never the test split); returns the epochs run.

    `plateau`: for a model whose validation accuracy is too noisy at a fixed rate for that
    rule to mean convergence (ResNet-8 with BatchNormalization stopped at epoch 14, 9 points
    below every model compressed from it): the rate is cut to 0.3x whenever validation
    accuracy has not improved for 2 epochs (ReduceLROnPlateau, down to 1/100 of the compiled
    rate), and EarlyStopping waits 8 epochs."""
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=8 if plateau else 5,
                                         restore_best_weights=True)
    callbacks = [stop]
    if plateau:
        rate = float(np.asarray(model.optimizer.learning_rate))
        callbacks.insert(0, keras.callbacks.ReduceLROnPlateau(
            monitor="val_accuracy", factor=0.3, patience=2, min_lr=rate / 100))
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:len(x) // 10], order[len(x) // 10:]
    h = model.fit(x[train], y[train], validation_data=(x[val], y[val]), batch_size=batch,
                  epochs=max_epochs, callbacks=callbacks, verbose=verbose)
    return len(h.history["loss"])


# --------------------------------------------------------------------------- hand-written

def tfmot_pcqat(baseline, x, y, cfg, steps, callbacks=(), from_logits=False, fine_lr=None):
    """Prune -> sparsity-preserving cluster -> PCQAT, as tfmot's tutorials write it.
    `callbacks` are added to every phase's fit (pipeline_timing.py times the epochs);
    `fine_lr`: the Cluster and PCQAT rate (default: collaborative_fit's default)."""
    model = keras.models.clone_model(baseline)
    model.set_weights(baseline.get_weights())
    ramp = max(1, cfg["prune_epochs"] - 1) * steps
    frequency = max(1, ramp // 10)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=0.5, begin_step=0,
        end_step=(ramp // frequency) * frequency, frequency=frequency)
    prunable = (keras.layers.Conv2D, keras.layers.Dense)

    def prune(layer):
        if type(layer) in prunable:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer
    pruned = compiled(keras.models.clone_model(model, clone_function=prune), cfg["lr"],
                      from_logits=from_logits)
    pruned.fit(x, y, batch_size=cfg["batch"], epochs=cfg["prune_epochs"], verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), *callbacks])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)

    def cluster(layer):
        if type(layer) in prunable:
            return tfmot.clustering.keras.cluster_weights(
                layer, number_of_clusters=cfg["clusters"], preserve_sparsity=True,
                cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS)
        return layer
    # The rate collaborative_fit uses by default: every phase at the compiled rate.
    if fine_lr is None:
        fine_lr = cfg["lr"]
    clustered = compiled(keras.models.clone_model(stripped, clone_function=cluster), fine_lr,
                         from_logits=from_logits)
    clustered.fit(x, y, batch_size=cfg["batch"], epochs=cfg["cluster_epochs"], verbose=0,
                  callbacks=list(callbacks))
    stripped = tfmot.clustering.keras.strip_clustering(clustered)
    qat = tfmot.quantization.keras.quantize_apply(
        tfmot.quantization.keras.quantize_annotate_model(stripped),
        tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
            preserve_sparsity=True))
    compiled(qat, fine_lr, from_logits=from_logits).fit(
        x, y, batch_size=cfg["batch"], epochs=cfg["qat_epochs"], verbose=0,
        callbacks=list(callbacks))
    return qat


def ours_pcqat(baseline, x, y, cfg, callbacks_on, callbacks=()):
    return colopt.collaborative_fit(
        baseline, x, y, phases=[colopt.Prune(sparsity=0.5, epochs=cfg["prune_epochs"]),
                                colopt.Cluster(clusters=cfg["clusters"],
                                               epochs=cfg["cluster_epochs"]),
                                colopt.Quantize(epochs=cfg["qat_epochs"])],
        batch_size=cfg["batch"], verbose=0, compression_metrics=callbacks_on,
        invariant_guard=callbacks_on, callbacks=list(callbacks)).model


# --------------------------------------------------------------------------- main

def _huffman_only(data: bytes) -> int:
    """Bytes of `data` deflated with Huffman coding only (no LZ77 matches), gzip framing."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_HUFFMAN_ONLY)
    return len(c.compress(data) + c.flush())


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--train", type=int, help="training samples (subsample)")
    ap.add_argument("--reps", type=int, default=1,
                    help="A B C C B A timing repetitions; 0 leaves timing to pipeline_timing.py")
    ap.add_argument("--baseline-epochs", type=int)
    ap.add_argument("--engine", choices=["tfmot", "keras3"], default="tfmot",
                    help="the Keras the models are built in: tf_keras (tfmot engine) or Keras 3")
    ap.add_argument("--converged", action="store_true",
                    help="train the baseline until validation stops improving (at most 60 "
                         "epochs), kept for a later --distill run")
    ap.add_argument("--distill", action="store_true",
                    help="every compression phase distils from the baseline")
    ap.add_argument("--smoke", action="store_true",
                    help="1 epoch per phase on 512 samples: checks the script, not the numbers")
    args = ap.parse_args()
    if args.engine == "keras3" and args.reps:
        ap.error("--engine keras3 has no hand-written tfmot pipeline to time: pass --reps 0")
    model_keras = keras if args.engine == "tfmot" else __import__("keras")
    suffix = ("" if args.engine == "tfmot" else "_keras3") + (
        "_converged" if args.converged else "") + ("_distill" if args.distill else "")
    cfg = dict(EXPERIMENTS[args.experiment])
    if args.baseline_epochs:
        cfg["baseline_epochs"] = args.baseline_epochs
    if args.smoke:
        cfg.update(baseline_epochs=1, prune_epochs=1, cluster_epochs=1, qat_epochs=1)
        args.train = 512
    t_start = time.time()
    (x, y), (xt, yt), about = cfg["data"](args.train or cfg["train"])
    if args.smoke:
        xt, yt = xt[:512], yt[:512]
    steps = -(-len(x) // cfg["batch"])
    print(f"{about['dataset']}; {steps} steps/epoch", flush=True)
    work = os.path.join(OUT, f"origin_{args.experiment}{suffix}")
    os.makedirs(work, exist_ok=True)

    t = time.time()
    baseline = compiled(cfg["model"](keras=model_keras), cfg["lr"], keras=model_keras)
    kept = os.path.join(OUT, f"origin_{args.experiment}_{args.engine}_{len(x)}"
                             "_converged.weights.h5")
    if args.converged and os.path.exists(kept) and not args.smoke:
        baseline.load_weights(kept)
        with open(kept + ".json") as f:
            cfg["baseline_epochs"] = json.load(f)["baseline_epochs"]
        print("baseline read from", kept, flush=True)
    elif args.converged:
        cfg["baseline_epochs"] = fit_converged(baseline, x, y, cfg["batch"],
                                               1 if args.smoke else 60, keras=model_keras,
                                               verbose=2)
        if not args.smoke:
            baseline.save_weights(kept)
            with open(kept + ".json", "w") as f:
                json.dump({"baseline_epochs": cfg["baseline_epochs"]}, f)
    else:
        baseline.fit(x, y, batch_size=cfg["batch"], epochs=cfg["baseline_epochs"], verbose=2,
                     validation_data=(xt, yt))
    baseline_s = time.time() - t
    phases = dict(prune=colopt.Prune(sparsity=0.5, epochs=cfg["prune_epochs"]),
                  cluster=colopt.Cluster(clusters=cfg["clusters"],
                                         epochs=cfg["cluster_epochs"]),
                  quantize=colopt.Quantize(epochs=cfg["qat_epochs"]))
    common = dict(validation_data=(xt, yt), batch_size=cfg["batch"], latency_runs=30,
                  representative_data=x[:256], verbose=0,
                  distill=True if args.distill else None)

    t = time.time()
    tree = colopt.explore(baseline, x, y, out_dir=os.path.join(work, "tree"), **phases,
                          **common)
    tree_s = time.time() - t
    t = time.time()
    per_channel = colopt.explore(
        baseline, x, y, out_dir=os.path.join(work, "tree_per_channel"),
        leaves=["Clustered+PTQ", "CQAT"], prune=phases["prune"], quantize=phases["quantize"],
        cluster=colopt.Cluster(clusters=cfg["clusters"], epochs=cfg["cluster_epochs"],
                               per_channel=True), **common)
    per_channel_s = time.time() - t

    # PCQAT's path without preservation: the origin's "93.21% without preservation".
    t = time.time()
    plain = colopt.collaborative_fit(
        baseline, x, y, phases=[phases["prune"], colopt.Cluster(
            clusters=cfg["clusters"], epochs=cfg["cluster_epochs"], preserve_sparsity=False),
            colopt.Quantize(epochs=cfg["qat_epochs"], preserve="none")],
        batch_size=cfg["batch"], verbose=0, distill=True if args.distill else None)
    info = colopt.export.to_tflite(plain.model, os.path.join(work, "pcqat_no_preservation.tflite"),
                                   representative_data=x[:256])
    no_pres = {"int8_accuracy": colopt.export.evaluate_tflite(info.path, xt, yt),
               "gzip_bytes": info.gzip_bytes, "tflite_bytes": info.tflite_bytes,
               "sparsity": float(np.mean([w.sparsity for w in
                                          colopt.export.inspect_tflite(info.path)])),
               "seconds": time.time() - t}

    # Timing, identical phases and epochs: A hand-written, B ours without callbacks, C ours.
    times = {"A": [], "B": [], "C": []}
    for _ in range(args.reps):
        for cond in ("A", "B", "C", "C", "B", "A"):
            t = time.perf_counter()
            if cond == "A":
                tfmot_pcqat(baseline, x, y, cfg, steps)
            else:
                ours_pcqat(baseline, x, y, cfg, callbacks_on=cond == "C")
            times[cond].append(time.perf_counter() - t)
            print(f"timing {cond}: {times[cond][-1]:.1f} s", flush=True)
            keras.backend.clear_session()  # each run's graphs; the baseline stays usable
            gc.collect()
    med = {k: statistics.median(v) for k, v in times.items()} if args.reps else None
    timing_md = f"pipeline_timing_{args.experiment}.md"

    def leaf(report, name):
        r = report.leaf(name)
        return None if r is None or not r.ok else r

    L = {n: leaf(tree, n) for n in colopt.tree.LEAVES}
    pc = {n: leaf(per_channel, n) for n in ("Clustered+PTQ", "CQAT")}
    base_fp32 = tree.baseline.fp32_accuracy
    acc = {n: (r.int8_accuracy if r else None) for n, r in L.items()}
    targets = [
        ("PCQAT INT8 within 1.0 point of the FP32 baseline",
         acc["PCQAT"] is not None and base_fp32 - acc["PCQAT"] <= 0.01,
         f"{pct(acc['PCQAT'])} vs {pct(base_fp32)} ({100 * (acc['PCQAT'] - base_fp32):+.2f} pt)"
         if acc["PCQAT"] is not None else "failed"),
        ("PQAT INT8 >= Pruned+PTQ", acc["PQAT"] is not None and acc["Pruned+PTQ"] is not None
         and acc["PQAT"] >= acc["Pruned+PTQ"], f"{pct(acc['PQAT'])} vs {pct(acc['Pruned+PTQ'])}"),
        ("CQAT INT8 >= Clustered+PTQ", acc["CQAT"] is not None and acc["Clustered+PTQ"] is not None
         and acc["CQAT"] >= acc["Clustered+PTQ"],
         f"{pct(acc['CQAT'])} vs {pct(acc['Clustered+PTQ'])}"),
        ("per-channel CQAT INT8 >= per-tensor CQAT",
         pc["CQAT"] is not None and acc["CQAT"] is not None
         and pc["CQAT"].int8_accuracy >= acc["CQAT"],
         f"{pct(pc['CQAT'].int8_accuracy if pc['CQAT'] else None)} vs {pct(acc['CQAT'])}"),
        ("PCQAT INT8 >= PCQAT path without preservation",
         acc["PCQAT"] is not None and acc["PCQAT"] >= no_pres["int8_accuracy"],
         f"{pct(acc['PCQAT'])} vs {pct(no_pres['int8_accuracy'])}"),
        ("PCQAT weights gzip within 1.3x of their entropy",
         L["PCQAT"] is not None
         and L["PCQAT"].weights_gzip_bytes <= 1.3 * L["PCQAT"].weights_entropy_bytes,
         f"{L['PCQAT'].weights_gzip_bytes:,} B gzip vs {L['PCQAT'].weights_entropy_bytes:,.0f} B "
         f"entropy: {L['PCQAT'].weights_gzip_bytes / L['PCQAT'].weights_entropy_bytes:.2f}x"
         if L["PCQAT"] else "failed"),
    ]
    if med:
        targets.append(("collaborative_fit / hand-written tfmot wall time <= 1.05 (no callbacks)",
                        med["B"] / med["A"] <= 1.05, f"{med['B'] / med['A']:.3f}"))

    result = {
        "experiment": args.experiment, "engine": args.engine, "about": about, "settings": {
            k: v for k, v in cfg.items() if k not in ("data", "model")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "tensorflow": tf.__version__,
                    "tfmot": tfmot.__version__ if hasattr(tfmot, "__version__") else "0.8.1"},
        "baseline_fp32_accuracy": base_fp32, "baseline_seconds": baseline_s,
        "tree": json.loads(tree.to_json()), "tree_seconds": tree_s,
        "per_channel": json.loads(per_channel.to_json()), "per_channel_seconds": per_channel_s,
        "pcqat_without_preservation": no_pres,
        "timing_s": times, "timing_median_s": med,
        "ratio_ours_no_callbacks_vs_tfmot": med["B"] / med["A"] if med else None,
        "ratio_ours_with_callbacks_vs_tfmot": med["C"] / med["A"] if med else None,
        "targets": [{"target": t, "met": bool(m), "measured": s} for t, m, s in targets],
        "wall_seconds": time.time() - t_start, "command": " ".join(sys.argv),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "origin": ORIGIN,
    }
    results = os.path.join(work, "smoke") if args.smoke else os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"origin_{args.experiment}{suffix}.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)

    def col(r, fp32=None, fake=False):
        if r is None:
            return ("failed",) * 3
        return (pct(fp32 if fp32 is not None else r.fp32_accuracy) + (" (Fake INT8)" if fake else ""),
                pct(r.int8_accuracy),
                f"{r.tflite_bytes:,} → {r.gzip_bytes:,} ({100 * (1 - r.gzip_bytes / r.tflite_bytes):.2f}%)")

    def table(title, headers, cols):
        rows = [f"### {title}", "", "| | " + " | ".join(headers) + " |",
                "|---|" + "---:|" * len(headers)]
        for i, label in enumerate(("FP32 Top-1 accuracy", "INT8 full integer quantization",
                                   "Compression (int8 .tflite → gzip)")):
            rows.append(f"| {label} | " + " | ".join(c[i] for c in cols) + " |")
        return rows + [""]

    base = col(L["PTQ"], fp32=base_fp32)
    lines = [f"# Origin's tables, small scale: {args.experiment}"
             + (" (Keras 3 engine)" if suffix else ""), "",
             f"Command: `python benchmarks/{' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}`"
             f" ({result['wall_seconds'] / 60:.1f} min on {os.cpu_count()} CPUs, TensorFlow "
             f"{tf.__version__}, tfmot 0.8.1). {about['dataset']}. Baseline trained "
             f"{cfg['baseline_epochs']} epochs"
             + (" (until validation accuracy stopped improving: EarlyStopping, patience 5, "
                "on 10 % of the training data)" if args.converged else "")
             + ("; every compression phase distils from the baseline (distill=True)"
                if args.distill else "") + f"; Prune 50 % {cfg['prune_epochs']} epochs, "
             f"Cluster {cfg['clusters']} {cfg['cluster_epochs']} epochs, QAT "
             f"{cfg['qat_epochs']} epochs, batch {cfg['batch']}, Adam {cfg['lr']} (every phase "
             "at the compiled rate, the library's default since December 2026). Accuracies "
             "on the full test split; INT8 = the int8 .tflite run with LiteRT.", ""]
    lines += table("PQAT", ["Baseline", "Pruned", "QAT", "PQAT"],
                   [base, col(L["Pruned+PTQ"]), col(L["QAT"], fake=True),
                    col(L["PQAT"], fake=True)])
    lines += table("CQAT", ["Baseline", "Clustered", "QAT", "CQAT"],
                   [base, col(L["Clustered+PTQ"]), col(L["QAT"], fake=True),
                    col(L["CQAT"], fake=True)])
    lines += table("Per-channel CQAT", ["Clustered per tensor", "CQAT per tensor",
                                        "Clustered per channel", "CQAT per channel"],
                   [col(L["Clustered+PTQ"]), col(L["CQAT"], fake=True),
                    col(pc["Clustered+PTQ"]), col(pc["CQAT"], fake=True)])
    lines += table("PCQAT", ["Baseline", "Pruned + clustered (sparsity-preserving)", "QAT",
                             "PCQAT"],
                   [base, col(L["SparseClustered+PTQ"]), col(L["QAT"], fake=True),
                    col(L["PCQAT"], fake=True)])
    lines += [f"PCQAT path without preservation (Prune → Cluster(preserve_sparsity=False) → "
              f"Quantize(preserve='none')): INT8 {pct(no_pres['int8_accuracy'])}, gzip "
              f"{no_pres['gzip_bytes']:,} B, mean weight sparsity in the .tflite "
              f"{100 * no_pres['sparsity']:.1f}%.", "",
              "### Compression against the entropy of the int8 weights", "",
              "Weights gzip: gzip -9 of the int8 weight tensors concatenated (the target's "
              "measure). Per tensor: each tensor gzipped alone, summed (the entropy is per "
              "tensor too). Huffman only: each tensor deflated without string matching "
              "(zlib Z_HUFFMAN_ONLY), summed: how close a byte-wise entropy coder gets.", "",
              "| leaf | weights entropy B | weights gzip B | gzip / entropy | per tensor "
              "/ entropy | Huffman only / entropy | .tflite gzip B |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in L.items():
        if r is not None:
            tensors = [w.tobytes() for w in colopt.export.read_weights(r.tflite).values()]
            per_tensor = sum(colopt.export.gzip_size(t) for t in tensors)
            huffman = sum(_huffman_only(t) for t in tensors)
            e = r.weights_entropy_bytes
            lines.append(f"| {n} | {e:,.0f} | {r.weights_gzip_bytes:,} | "
                         f"{r.weights_gzip_bytes / e:.2f} | {per_tensor / e:.2f} | "
                         f"{huffman / e:.2f} | {r.gzip_bytes:,} |")
    lines += ["", "### Speed: collaborative_fit vs the same pipeline hand-written with tfmot", ""]
    if not med:
        lines += [f"Not timed in this run (`--reps 0`): timed alone on a quiet machine by "
                  f"`benchmarks/pipeline_timing.py`, see [{timing_md}]({timing_md}).", ""]
    else:
        lines += [
            f"PCQAT path (Prune {cfg['prune_epochs']} → Cluster {cfg['cluster_epochs']} → "
            f"PCQAT {cfg['qat_epochs']} epochs) from the same baseline, order A B C C B A "
            f"× {args.reps}; medians:", "",
            "| | wall time | ratio to tfmot |", "|---|---:|---:|",
            f"| A: hand-written tfmot | {med['A']:.1f} s | 1.000 |",
            f"| B: collaborative_fit, no callbacks | {med['B']:.1f} s | "
            f"{med['B'] / med['A']:.3f} |",
            f"| C: collaborative_fit, CompressionMetrics + InvariantGuard | {med['C']:.1f} s | "
            f"{med['C'] / med['A']:.3f} |", ""]
    lines += ["### Targets", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {t} | {'yes' if m else '**no**'} | {s} |" for t, m, s in targets]
    lines += ["", "Origin's figures for comparison: " + "; ".join(
        f"{k}: {v}" for k, v in ORIGIN.items()) + "."]
    with open(os.path.join(results, f"origin_{args.experiment}{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
