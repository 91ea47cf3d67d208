"""The Keras 3 models people build in 2026, through the Keras 3 engine (issue 28).

  model                                          data
  KWT-style keyword transformer (conv patches,   synthesized keywords (benchmarks/kws_data.py),
    2 blocks: LayerNorm, MultiHeadAttention,       --kws-train clips
    gelu MLP)
  MobileNetV3Small (keras.applications,          Fashion-MNIST, --fashion-train images,
    weights=None, 32x32x1)                         padded to 32x32
  EfficientNetB0 (keras.applications,            the same (0-255, the model rescales and
    weights=None, 32x32x1)                         normalizes itself)
  text classifier (Embedding, Conv1D, Dense)     sentences of the Python standard library's
                                                   docstrings, labelled by package (below)
  LSTM keyword spotter (LSTM(64) over the 49      synthesized keywords, as the KWT
    frames of 10 MFCCs, Dense)

Each is trained with Adam and a cosine decay to 0 (--epochs), then compiled again at Adam(1e-3),
as users hand us models. Then, side by side:

  FP32     the float model's accuracy
  PTQ      post-training int8 (to_tflite(quantization="int8")), accuracy in LiteRT
  PCQAT    Prune 50 % (2) -> Cluster 8, sparsity-preserving (2) -> PCQAT (2; other epochs
           with --phase-epochs, e.g. the origin table's 4 3 2), the library's
           defaults (rate probe), int8 in LiteRT. Where the engine refuses QAT (the
           LSTM: LiteRT has no int8 loop to train toward), Prune -> Cluster then
           post-training int8 ("P+C PTQ", its recurrent layer exported unrolled) and the
           refusal's reason.

and for the compressed file: gzip size; the share of the file's weight values that are
compressed (a tensor counts when it holds >= 45 % zeros and <= 8 values per output channel),
the others named; and, where Vela runs it, the Ethos-U55-128 encoded weights and latency of the
fully integer file against PTQ's.

Text data: every docstring of the public functions, classes and methods of ten standard-library
packages (email, http, xml, json, unittest, asyncio, logging, sqlite3, multiprocessing,
importlib), split into sentences of 4+ words; a sentence's label is its package. Lowercased
words, the 2,000 most frequent (0 = padding, 1 = other), 24 tokens. Python's documentation is
under the PSF licence; nothing is downloaded.

With --distill every phase distils from the float model (`distill=True`): rows
"<model> (distilled)".

Run: python benchmarks/keras3_models.py [--models kwt mnv3 effnet text lstm] [--distill]
     python benchmarks/keras3_models.py --smoke   (checks the script)
Writes benchmarks/results/keras3_models_<model>.json and keras3_models.md (from every file).
"""

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
import origin_tables as ot  # noqa: E402
import stdlib_text  # noqa: E402

L = keras.layers
RESULTS = os.path.join(HERE, "results")
PACKAGES = stdlib_text.PACKAGES
VOCAB, LENGTH = 2000, 24


# --------------------------------------------------------------------------- data

def text_data(seed=0):
    # Built in a fresh interpreter: what a package's modules hold depends on what else the
    # process has imported (TensorFlow, Keras), and the data set must not.
    import subprocess

    done = subprocess.run([sys.executable, os.path.join(HERE, "stdlib_text.py")],
                          capture_output=True, text=True, check=True)
    pairs = [tuple(p) for p in json.loads(done.stdout)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    cut = int(0.8 * len(pairs))
    counts = {}
    for i in order[:cut]:
        for w in pairs[i][0].split():
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:VOCAB - 2]
    index = {w: i + 2 for i, w in enumerate(words)}

    def encode(ids):
        x = np.zeros((len(ids), LENGTH), np.int32)
        for row, i in enumerate(ids):
            toks = [index.get(w, 1) for w in pairs[i][0].split()][:LENGTH]
            x[row, :len(toks)] = toks
        return x, np.array([pairs[i][1] for i in ids], np.int64)
    return encode(order[:cut]), encode(order[cut:]), {
        "dataset": f"{len(pairs)} docstring sentences of {len(PACKAGES)} standard-library "
                   f"packages (Python {platform.python_version()}), 80/20 split, "
                   f"{VOCAB} words, {LENGTH} tokens"}


# --------------------------------------------------------------------------- models

def kwt(classes, shape, dim=64, heads=4, blocks=2):
    i = keras.Input(shape)
    h = L.Reshape((shape[0], shape[1] * shape[2]))(i)
    h = L.Conv1D(dim, 3, padding="same", name="patches")(h)  # local position, as patches
    for b in range(blocks):
        n = L.LayerNormalization(name=f"ln{b}a")(h)
        h = L.Add()([h, L.MultiHeadAttention(heads, dim // heads, name=f"mha{b}")(n, n)])
        n = L.LayerNormalization(name=f"ln{b}b")(h)
        m = L.Dense(2 * dim, activation="gelu", name=f"mlp{b}a")(n)
        h = L.Add()([h, L.Dense(dim, name=f"mlp{b}b")(m)])
    h = L.GlobalAveragePooling1D()(L.LayerNormalization(name="ln_out")(h))
    return keras.Model(i, L.Dense(classes, name="logits")(h), name="kwt")


def text_model(classes):
    i = keras.Input((LENGTH,), dtype="int32")
    h = L.Embedding(VOCAB, 64, name="embedding")(i)
    h = L.Conv1D(96, 3, activation="relu", name="conv")(h)
    h = L.GlobalMaxPooling1D()(h)
    h = L.Dense(64, activation="relu", name="hidden")(h)
    return keras.Model(i, L.Dense(classes, name="logits")(L.Dropout(0.3)(h)), name="text")


def lstm_kws(classes, shape, units=64):
    i = keras.Input(shape)
    h = L.LSTM(units, name="lstm")(L.Reshape((shape[0], shape[1] * shape[2]))(i))
    return keras.Model(i, L.Dense(classes, name="logits")(h), name="lstm_kws")


def _bn_momentum(model, momentum=0.99):
    """Keras' MobileNetV3 sets BatchNormalization's momentum to 0.999 (for ImageNet's
    20,000 steps an epoch): in 15 epochs of 94 steps its moving statistics stay near their
    start, and the model trained to 85 % in training mode scored 10 % at inference. Keras'
    default, 0.99, as one would train it on a small set."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.momentum = momentum
    return model


def _fashion(args, scale=1.0):
    (x, y), (xt, yt), about = ot.fashion_mnist(args.fashion_train)
    return (x * scale, y), (xt[:args.test] * scale, yt[:args.test]), about


def _kws(args):
    (x, y), (xt, yt), about = ot.kws(args.kws_train)
    return (x, y), (xt[:args.test], yt[:args.test]), about


MODELS = {
    "kwt": (_kws, lambda: kwt(12, (49, 10, 1)), 3e-3),
    "mnv3": (_fashion, lambda: _bn_momentum(keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 1), weights=None, classes=10, include_preprocessing=False,
        classifier_activation=None)), 3e-3),
    "effnet": (lambda args: _fashion(args, 255.0), lambda: keras.applications.EfficientNetB0(
        input_shape=(32, 32, 1), weights=None, classes=10, classifier_activation=None), 3e-3),
    "text": (lambda args: text_data(), lambda: text_model(len(PACKAGES)), 3e-3),
    "lstm": (_kws, lambda: lstm_kws(12, (49, 10, 1)), 3e-3),
}


# --------------------------------------------------------------------------- measures

def compressed_share(path):
    """(share of the file's weight values in compressed tensors, [names of the others])."""
    total = done = 0
    others = []
    for w in colopt.export.inspect_tflite(path):
        n = int(np.prod(w.shape))
        total += n
        if w.sparsity >= 0.45 and w.unique_per_channel_max <= 8:
            done += n
        else:
            others.append(f"{w.name} ({w.op}, {n} values, {w.sparsity:.0%} zeros, "
                          f"{w.unique_per_channel_max} per channel)")
    return done / max(1, total), others


def ethos_u(model, x, folder, name):
    try:
        info = colopt.export.to_tflite(model, os.path.join(folder, name + "_io.tflite"),
                                       quantization="int8", representative_data=x[:256],
                                       io="int8",
                                       target=colopt.targets.EthosU("ethos-u55-128"))
        r = info.on_target
        return {"weight_bytes": r.weight_bytes, "latency_ms": r.latency_ms,
                "cpu_ops": r.cpu_ops, "npu_ops": r.npu_ops}
    except Exception as e:  # noqa: BLE001 (reported in the table, not hidden)
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def run(name, args):
    load, build, lr = MODELS[name]
    (x, y), (xt, yt), about = load(args)
    if args.smoke:
        x, y, xt, yt = x[:256], y[:256], xt[:128], yt[:128]
    keras.utils.set_random_seed(0)
    model = build()
    epochs = 1 if args.smoke else args.epochs
    steps = epochs * -(-len(x) // args.batch)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    t0 = time.time()
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
                  loss=loss, metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=args.batch, verbose=0)
    model.compile(keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    out = {"model": name + _variant(args)[0], "phase_epochs": args.phase_epochs,
           "about": about, "params": int(model.count_params()),
           "train": len(x), "test": len(xt), "epochs": epochs,
           "float_accuracy": float(model.evaluate(xt, yt, verbose=0, batch_size=256)[1]),
           "train_seconds": round(time.time() - t0)}
    print(name, "float", out["float_accuracy"], out["train_seconds"], "s", flush=True)
    with tempfile.TemporaryDirectory() as d:
        ptq = colopt.export.to_tflite(model, os.path.join(d, "ptq.tflite"),
                                      quantization="int8", representative_data=x[:256])
        out["ptq"] = {"int8_accuracy": colopt.export.evaluate_tflite(ptq.path, xt, yt),
                      "gzip_bytes": ptq.gzip_bytes, "ethos_u55_128": ethos_u(model, x, d, "ptq")}
        print(name, "PTQ", out["ptq"], flush=True)
        pe = [1, 1, 1] if args.smoke else args.phase_epochs
        phases = [colopt.Prune(0.5, epochs=pe[0]), colopt.Cluster(8, epochs=pe[1]),
                  colopt.Quantize(epochs=pe[2])]
        t1 = time.time()
        try:
            r = colopt.collaborative_fit(model, x, y, batch_size=args.batch, verbose=0,
                                         phases=phases, distill=args.distill or None)
            path, kind = "pcqat", "PCQAT"
        except ValueError as e:
            out["qat_refused"] = str(e).split(". Expected")[0]
            r = colopt.collaborative_fit(model, x, y, batch_size=args.batch, verbose=0,
                                         phases=phases[:2], distill=args.distill or None)
            path, kind = "pc_ptq", "P+C PTQ"
        info = colopt.export.to_tflite(r.model, os.path.join(d, path + ".tflite"),
                                       quantization="int8", representative_data=x[:256])
        share, others = compressed_share(info.path)
        out["compressed"] = {
            "kind": kind, "int8_accuracy": colopt.export.evaluate_tflite(info.path, xt, yt),
            "keras_accuracy": float(r.model.evaluate(xt, yt, verbose=0, batch_size=256)[1]),
            "gzip_bytes": info.gzip_bytes, "compressed_share": share, "not_compressed": others,
            "skipped": r.skipped, "seconds": round(time.time() - t1),
            "ethos_u55_128": ethos_u(r.model, x, d, path)}
        print(name, kind, {k: v for k, v in out["compressed"].items() if k != "not_compressed"},
              flush=True)
    return out


def _variant(args):
    """(the row's label suffix, its results file's suffix) for --distill and --phase-epochs
    other than 2 2 2: (" (distilled) (4/3/2 epochs)", "_distill_4-3-2")."""
    other = args.phase_epochs != [2, 2, 2]
    epochs = [str(e) for e in args.phase_epochs]
    return ((" (distilled)" if args.distill else "")
            + (f" ({'/'.join(epochs)} epochs)" if other else ""),
            ("_distill" if args.distill else "") + ("_" + "-".join(epochs) if other else ""))


def table(folder):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "keras3_models_*.json"))):
        with open(path) as f:
            rows.append(json.load(f))
    lines = ["# The Keras 3 models of 2026 through the Keras 3 engine (issue 28)", "",
             "Generated by `benchmarks/keras3_models.py` (see its docstring for the models, "
             "data and plan). Accuracy of the int8 `.tflite` in LiteRT; Ethos-U55-128 figures "
             "from Vela 5.2 on the fully integer files.", "",
             "| model (params) | data | FP32 | PTQ int8 | compressed int8 | Δ vs FP32 | gzip PTQ → "
             "compressed | weights compressed | U55-128 weights PTQ → compressed | U55-128 "
             "latency PTQ → compressed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in rows:
        c, p = r["compressed"], r["ptq"]
        pu, cu = p["ethos_u55_128"], c["ethos_u55_128"]
        # "—": Vela refused that file (its reason in the notes)
        npu_w = " → ".join(f"{u['weight_bytes']:,}" if "weight_bytes" in u else "—"
                           for u in (pu, cu))
        npu_t = " → ".join(f"{u['latency_ms'] * 1000:.0f}" if "latency_ms" in u else "—"
                           for u in (pu, cu)) + " µs"
        lines.append(
            f"| {r['model']} ({r['params']:,}) | {r['about']['dataset']} | "
            f"{r['float_accuracy'] * 100:.2f} | {p['int8_accuracy'] * 100:.2f} | "
            f"{c['kind']}: {c['int8_accuracy'] * 100:.2f} | "
            f"{(c['int8_accuracy'] - r['float_accuracy']) * 100:+.2f} | "
            f"{p['gzip_bytes']:,} → {c['gzip_bytes']:,} | {c['compressed_share']:.1%} | "
            f"{npu_w} | {npu_t} |")
        if "keras_accuracy" in c:
            notes.append(f"- {r['model']}: the compressed model scores "
                         f"{c['keras_accuracy'] * 100:.2f} in Keras (before the int8 file).")
        if r.get("qat_refused"):
            notes.append(f"- {r['model']}: QAT refused before training: {r['qat_refused']}.")
        if c["not_compressed"]:
            notes.append(f"- {r['model']}: not compressed in the file: "
                         + "; ".join(c["not_compressed"]) + ".")
        for label, skipped in c["skipped"].items():
            if skipped:
                notes.append(f"- {r['model']}: {label} named as skipped: {skipped}.")
        for kind, u in (("PTQ", pu), ("compressed", cu)):
            if "error" in u:
                notes.append(f"- {r['model']}: Vela on the {kind} file: {u['error']}.")
            elif u.get("cpu_ops"):
                notes.append(f"- {r['model']}: on the U55-128 the {kind} file leaves to the "
                             f"CPU: {u['cpu_ops']}.")
    return "\n".join(lines + [""] + notes) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fashion-train", type=int, default=6000)
    ap.add_argument("--kws-train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--phase-epochs", type=int, nargs=3, default=[2, 2, 2],
                    metavar=("PRUNE", "CLUSTER", "QUANTIZE"),
                    help="epochs of the three phases; other than 2 2 2: rows "
                         "keras3_models_<model>_<p>-<c>-<q>.json")
    ap.add_argument("--distill", action="store_true",
                    help="every phase distils from the float model (distill=True); rows "
                         "keras3_models_<model>_distill.json")
    args = ap.parse_args()
    folder = tempfile.mkdtemp() if args.smoke else RESULTS
    for name in args.models:
        out = run(name, args)
        out["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
        with open(os.path.join(folder, f"keras3_models_{name}{_variant(args)[1]}.json"),
                  "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(folder, "keras3_models.md"), "w") as f:
            f.write(table(folder))
    print(table(folder))


if __name__ == "__main__":
    main()
