"""The fine-tuning rate policy as a held-out experiment (issue 24).

The compiled-rate default (finetune_policy.py) was chosen on baselines trained at a constant
rate and stopped by EarlyStopping; models trained the way users train them (a decaying
schedule to convergence, then compiled again at Keras' default Adam(1e-3) to be handed to
us) lost 4-23 points under it. Here every model comes in both kinds:

  const   trained at Adam(1e-3) until validation accuracy stops improving (EarlyStopping,
          patience 5, best weights; 10 % of the training data held out), as before;
  decay   trained with Adam and a cosine decay from 3e-3 to 0 over a fixed number of epochs
          (to convergence: the schedule ends at 0), then compiled again at Adam(1e-3).

  model                                        data                                  kind
  demo CNN (conv 16/32, dense 64)              embedded digits (8x8)                 choice
  small CNN (conv 32/64, dense 128)            Fashion-MNIST, --fashion-train images  choice
  DS-CNN (ARM ML-Zoo / MLPerf Tiny KWS)        synthesized keywords, --kws-train clips held out
  MobileNet v1 0.25 (32x32x1)                  Fashion-MNIST, --fashion-train images  held out

Plan: explore()'s PCQAT path, Prune 50 % (2) -> Cluster 8 sparsity-preserving (2) -> PCQAT
(1), int8 .tflite, accuracy in LiteRT on the test split, Keras 3 engine. Policies:

  compiled      every phase at the compiled rate (rate_policy="compiled"; the default
                2026-12-01..06)
  tenth         every phase at a tenth of it (learning_rate= on each phase; a candidate for
                the fallback where no probe can run, which took the compiled rate instead)
  probe         keras_colopt.RateProbe(tolerance=0.05): candidates 1, 0.3, 0.1, 0.03, 0.01 x
                the compiled rate, 16 steps each, loss on 8 other batches, the largest rate
                within 5 % of the best loss
  probe_loose   the same probe with tolerance=0.2 (the largest rate within 20 % of the best):
                the library's default, chosen on the choice pairs (below)
  probe_48      RateProbe(steps=48, tolerance=0.2): proposed after the held-out rows ran
                (so not a held-out result there): does a longer probe see past the first
                steps of a fresh Adam, which move every weight by about the full rate? It was
                best or tied on all four held-out pairs. Rule written down before the second
                held-out pairs (ResNet-8 on Fashion, MobileNetV2 0.15 on keywords, const and
                decay) ran: probe_48 becomes the default if it is within 0.5 point of the best
                of compiled, probe_loose and probe_48 on each of them.
  tfmot_1e-5    the same path written by hand with tfmot as its tutorials do it: pruning at
                Adam(1e-3), clustering and PCQAT fine-tuned at Adam(1e-5) (tf_keras copy of
                the same baseline)

The policy is chosen on the four choice pairs, then reported unchanged on the four held-out
pairs. The rule: among the policies within 0.5 point of the best on every choice pair (the
criterion of the earlier sweep), the one whose largest drop below the float baseline is the
smallest. On the choice pairs compiled, probe and probe_loose were all within 0.3 point of
each pair's best (a tie inside one seed's spread); their largest drops below float were
0.71, 0.58 and 0.51 points: probe_loose (written down before the held-out pairs ran). Each pair's result is
written on its own (benchmarks/results/finetune_heldout_<pair>.json); every run rebuilds the
table (benchmarks/results/finetune_heldout.md) from the files present.

Run: python benchmarks/finetune_heldout.py --pairs demo-const demo-decay fcnn-const fcnn-decay
     python benchmarks/finetune_heldout.py --pairs dscnn-const dscnn-decay --kws F
     python benchmarks/finetune_heldout.py --pairs demo-decay --smoke   (checks the script)
"""

import argparse
import json
import logging
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
import tf_keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
import finetune_policy as fp  # noqa: E402
import origin_tables as ot  # noqa: E402

POLICIES = ("compiled", "tenth", "probe", "probe_loose", "tfmot_1e-5", "probe_48")
CHOSEN = "probe_loose"  # the library's default, chosen on the choice pairs (docstring)
LR = 1e-3


def fashion_cnn(seed, classes=10, shape=(32, 32, 1), keras=keras):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    return keras.Sequential([
        keras.Input(shape),
        L.Conv2D(32, 3, activation="relu", name="conv1"), L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu", name="conv2"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(128, activation="relu", name="dense1"),
        L.Dense(classes, name="logits")], name="fashion_cnn")


def _kws(args):
    (x, y), (xt, yt), _ = fp._kws(args.kws)
    if args.kws_train and args.kws_train < len(x):
        keep = np.random.default_rng(0).permutation(len(x))[:args.kws_train]
        x, y = x[keep], y[keep]
    return (x, y), (xt, yt), f"synthesized keywords ({len(x)} train / {len(xt)} test clips)"


MODELS = {  # data, builder, batch, decay epochs, most const epochs, set
    "demo": (lambda a: fp._digits(), fp.demo_cnn, 32, 60, 200, "choice"),
    "fcnn": (lambda a: fp._fashion(a.fashion_train), fashion_cnn, 64, 20, 60, "choice"),
    "dscnn": (_kws, fp.ds_cnn, 64, 20, 60, "held out"),
    "mobilenet": (lambda a: fp._fashion(a.fashion_train), fp.mobilenet, 64, 20, 60, "held out"),
    "resnet": (lambda a: fp._fashion(a.fashion_train), fp.resnet8, 64, 20, 60, "second held out"),
    "mobilenetv2": (_kws, fp.mobilenetv2, 64, 20, 60, "second held out"),
}
PAIRS = [f"{m}-{k}" for m in MODELS for k in ("const", "decay")]


def baseline(pair, x, y, args):
    """The pair's float baseline (kept in benchmarks/out/), compiled at Adam(1e-3)."""
    name, kind = pair.split("-")
    _, build, batch, decay_epochs, max_epochs, _ = MODELS[name]
    path = os.path.join(HERE, "out", f"finetune_heldout_{pair}_{len(x)}.weights.h5")
    return fp.kept_baseline(path, lambda: _train(kind, build, x, y, batch, decay_epochs,
                                                 max_epochs, args.smoke),
                            lambda: fp.compiled(build(0), LR), args.smoke)


def _train(kind, build, x, y, batch, decay_epochs, max_epochs, smoke):
    model = fp.compiled(build(0), LR)
    if kind == "const":
        epochs = ot.fit_converged(model, x, y, batch, 1 if smoke else max_epochs, 0,
                                  keras=keras)
    else:
        epochs = 1 if smoke else decay_epochs
        steps = epochs * -(-len(x) // batch)
        model.compile(optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(3e-3, steps)), metrics=["accuracy"],
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        keras.utils.set_random_seed(0)
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
        weights = model.get_weights()
        model = fp.compiled(build(0), LR)  # handed over: compiled again at Keras' default
        model.set_weights(weights)
    return model, epochs


class _Rates(logging.Handler):
    """Collects the phases' learning-rate log lines."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if "learning rate" in msg:
            self.lines.append(msg)


def run_policy(policy, build, weights, x, y, batch, epochs):
    if policy == "tfmot_1e-5":
        twin = build(0, keras=tf_keras)
        twin.set_weights(weights)
        cfg = {"lr": LR, "batch": batch, "prune_epochs": epochs[0], "clusters": 8,
               "cluster_epochs": epochs[1], "qat_epochs": epochs[2]}
        return ot.tfmot_pcqat(twin, x, y, cfg, -(-len(x) // batch), from_logits=True,
                              fine_lr=1e-5), []
    model = fp.compiled(build(0), LR)
    model.set_weights(weights)
    extra = {"tenth": {"learning_rate": LR / 10}}.get(policy, {})
    kwargs = {"compiled": {"rate_policy": "compiled"},  # every policy named in full
              "probe": {"rate_policy": colopt.RateProbe(tolerance=0.05)},
              "probe_loose": {"rate_policy": colopt.RateProbe(tolerance=0.2)},
              "probe_48": {"rate_policy": colopt.RateProbe(steps=48, tolerance=0.2)},
              }.get(policy, {})
    handler = _Rates()
    logger = logging.getLogger("keras_colopt")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        r = colopt.collaborative_fit(
            model, x, y, batch_size=batch, verbose=0, **kwargs, phases=[
                colopt.Prune(sparsity=0.5, epochs=epochs[0], **extra),
                colopt.Cluster(clusters=8, epochs=epochs[1], **extra),
                colopt.Quantize(epochs=epochs[2], **extra)])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return r.model, handler.lines


def run_pair(pair, args):
    name, kind = pair.split("-")
    load, build, batch, _, _, which = MODELS[name]
    (x, y), (xt, yt), about = load(args)
    if args.smoke:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
    t0 = time.time()
    base, base_epochs = baseline(pair, x, y, args)
    weights = base.get_weights()
    float_acc = float(base.evaluate(xt, yt, verbose=0)[1])
    epochs = (1, 1, 1) if args.smoke else (2, 2, 1)
    out = {"pair": pair, "set": which, "about": about,
           "model": base.name, "baseline": kind, "baseline_epochs": base_epochs,
           "float_accuracy": float_acc, "phase_epochs": epochs, "policies": {}}
    with tempfile.TemporaryDirectory() as d:
        out["ptq_int8_accuracy"], _ = fp.int8_accuracy(base, xt, yt, d, "base",
                                                       representative=x[:256])
        print(pair, "baseline", base_epochs, "epochs, float", round(float_acc, 4), "PTQ",
              round(out["ptq_int8_accuracy"], 4), flush=True)
        for policy in args.policies:
            keras.utils.set_random_seed(1)
            tf_keras.utils.set_random_seed(1)
            t = time.time()
            model, lines = run_policy(policy, build, weights, x, y, batch, epochs)
            acc, gz = fp.int8_accuracy(model, xt, yt, d, policy,
                                       representative=x[:256] if policy.startswith("tfmot")
                                       else None)
            out["policies"][policy] = {"int8_accuracy": acc, "gzip_bytes": gz,
                                       "seconds": round(time.time() - t), "rates": lines}
            print(pair, policy, round(acc, 4), round(time.time() - t), "s", flush=True)
    out["seconds"] = round(time.time() - t0)
    return out


def table(results_dir):
    pairs = fp.read_pairs(results_dir, "finetune_heldout")
    if not pairs:
        return ""
    lines = ["# Fine-tuning rate policy, held out (issue 24)", "",
             "Prune 50 % (2) -> Cluster 8 sparsity-preserving (2) -> PCQAT (1), Keras 3 engine, "
             "int8 accuracy in LiteRT on each pair's test split (1 fine-tuning seed). `const`: "
             "baseline trained at Adam(1e-3) until validation accuracy stops improving; `decay`: "
             "trained with a cosine decay to 0, then compiled again at Adam(1e-3). `*` best of "
             "our policies on the pair. Δ: the chosen policy's int8 accuracy minus the float "
             "baseline, and minus the hand-written tfmot path at its tutorials' Adam(1e-5). "
             "Command: `python benchmarks/finetune_heldout.py` (see its docstring).", ""]
    for title, which in (("Choice pairs (the policy was chosen on these)", "choice"),
                         ("Held-out pairs (reported with the policy unchanged)", "held out"),
                         ("Second held-out pairs (probe_48 against the two defaults)",
                          "second held out")):
        rows = {p: r for p, r in pairs.items() if r["set"] == which}
        if not rows:
            continue
        policies = [p for p in POLICIES if all(p in r["policies"] for r in rows.values())]
        ours = [p for p in policies if not p.startswith("tfmot")]
        lines += [f"## {title}", "",
                  "| pair | float (epochs) | PTQ int8 | " + " | ".join(policies)
                  + f" | Δ {CHOSEN} vs float | Δ {CHOSEN} vs tfmot |",
                  "|---|---:|---:|" + "---:|" * (len(policies) + 2)]
        for pair, r in rows.items():
            acc = {p: r["policies"][p]["int8_accuracy"] for p in policies}
            best = max(acc[p] for p in ours)
            cells = [f"{acc[p] * 100:.2f}{'*' if p in ours and acc[p] == best else ''}"
                     for p in policies]
            d_float = (acc[CHOSEN] - r["float_accuracy"]) * 100 if CHOSEN in acc else None
            d_tfmot = ((acc[CHOSEN] - acc["tfmot_1e-5"]) * 100
                       if CHOSEN in acc and "tfmot_1e-5" in acc else None)
            fmt = (lambda v: "" if v is None else f"{v:+.2f}")
            lines.append(f"| {pair}: {r['model']}, {r['about']} | {r['float_accuracy'] * 100:.2f}"
                         f" ({r['baseline_epochs']}) | {r['ptq_int8_accuracy'] * 100:.2f} | "
                         + " | ".join(cells) + f" | {fmt(d_float)} | {fmt(d_tfmot)} |")
        gaps = {p: max(max(r["policies"][q]["int8_accuracy"] for q in ours)
                       - r["policies"][p]["int8_accuracy"] for r in rows.values()) * 100
                for p in ours}
        lines += ["", "Largest distance to the best of our policies on a pair: "
                  + ", ".join(f"{p} {g:.2f}" for p, g in gaps.items()) + " points.", ""]
    lines.append("Rates each probe chose, per pair (from the phases' log lines): see the "
                 "`rates` of each pair's JSON file.")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "finetune_heldout.md"), "w") as f:
        f.write(text)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", nargs="+", choices=PAIRS, default=PAIRS[:4])
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--kws", default=os.path.join(HERE, "out", "kws", "kws_features.npz"))
    ap.add_argument("--kws-train", type=int, default=6000)
    ap.add_argument("--fashion-train", type=int, default=6000)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    results = tempfile.mkdtemp() if args.smoke else os.path.join(HERE, "results")
    for pair in args.pairs:
        r = run_pair(pair, args)
        path = os.path.join(results, f"finetune_heldout_{pair}.json")
        if os.path.exists(path):  # other policies of the same baseline: kept beside
            with open(path) as f:
                before = json.load(f)
            if before["float_accuracy"] == r["float_accuracy"]:
                r["policies"] = {**before["policies"], **r["policies"]}
                r["command"] = before.get("command", "") + " ; " + " ".join(["python"] + sys.argv)
        r.setdefault("command", " ".join(["python"] + sys.argv))
        r.update(machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                          "keras": keras.__version__})
        with open(os.path.join(results, f"finetune_heldout_{pair}.json"), "w") as f:
            json.dump(r, f, indent=2)
    print(table(results))


if __name__ == "__main__":
    main()
