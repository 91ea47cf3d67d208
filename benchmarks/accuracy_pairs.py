"""What compression costs, per model/data pair (issue 13's table): the converged FP32
baseline, and PCQAT int8 three ways, same epochs, side by side in one run:

  ours            collaborative_fit with the library's defaults (or --policy)
  ours + distill  the same with `distill=True` (a frozen copy of the baseline as teacher)
  tfmot           the same pipeline hand-written with tfmot (tf_keras, as its tutorials do:
                  Prune, then sparsity-preserving clustering, then PCQAT, each phase at the
                  compiled rate; Conv2D and Dense only, as tfmot prunes and clusters)

and, asked for with --rows (added to a pair's existing file, same baseline), our two rows on
tfmot's layers: depthwise kernels left out of Prune and Cluster (`layers=` predicate), so that
a difference to tfmot can be split into the engine and the choice of layers:

  ours_convdense, ours_distill_convdense

and, with --distill-settings T,W ..., ours + distill at other Distill(temperature, weight)
settings than the defaults (rows ours_distill_T<T>_w<W>, added the same way).

Plan on every pair: Prune 50 % (2 epochs) -> Cluster 8 (2) -> PCQAT (1), int8 `.tflite`,
accuracy in LiteRT on the pair's test split. The pairs, models and converged baselines are
finetune_policy.py's (its cached baselines in benchmarks/out/ are reused, so both tables
compare against the same float model); the tf_keras copy of each model is checked to compute
what the Keras 3 one does before it is used. Targets (issue 13): ours within 1.0 point of
FP32, and no pair below tfmot.

Writes benchmarks/results/accuracy_pairs_<pair>.json per pair and rebuilds
benchmarks/results/accuracy_pairs.md from the files present.

Run: python benchmarks/accuracy_pairs.py --pairs demo --seeds 2
     python benchmarks/accuracy_pairs.py --pairs mobilenetv2 --kws F --rows ours_convdense
     python benchmarks/accuracy_pairs.py --pairs dscnn --kws F --distill-settings 4,0.5
     python benchmarks/accuracy_pairs.py --pairs mobilenet --rows tfmot --first-seed 1 --seeds 1
     python benchmarks/accuracy_pairs.py --pairs dscnn mobilenetv2 --kws F --seeds 2
     python benchmarks/accuracy_pairs.py --pairs demo --smoke   (checks the script only)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import finetune_policy as fp  # noqa: E402  (Keras 3, keras_colopt)
import origin_tables as ot  # noqa: E402  (tf_keras, tfmot)

import numpy as np  # noqa: E402

import keras  # noqa: E402
import keras_colopt as colopt  # noqa: E402
import tf_keras  # noqa: E402

ROWS = ("ours", "ours_distill", "tfmot")
CONVDENSE = ("ours_convdense", "ours_distill_convdense")  # depthwise left out, as tfmot


def distill_row(setting):
    """`--distill-settings T,W` -> the row name `ours_distill_T<T>_w<W>`."""
    t, w = (float(v) for v in setting.split(","))
    return f"ours_distill_T{t:g}_w{w:g}"


def distill_of(row):
    """What the row passes as `distill`: None, True (the defaults) or a Distill."""
    if row.startswith("ours_distill_T"):
        t, w = row[len("ours_distill_T"):].split("_w")
        return colopt.Distill(temperature=float(t), weight=float(w))
    return True if row.startswith("ours_distill") else None


def convdense(layer):
    """tfmot's prunable and clusterable layers in tfmot_pcqat: Conv2D and Dense, not
    DepthwiseConv2D (a Conv2D subclass in Keras 3 too, hence the exact type)."""
    return type(layer) in (keras.layers.Conv2D, keras.layers.Dense)


def existing(pair, args):
    """The pair's result file when --rows adds to it, else None."""
    path = os.path.join(HERE, "results", f"accuracy_pairs_{pair}.json")
    if (args.smoke or (set(args.rows) == set(ROWS) and not args.first_seed)
            or not os.path.exists(path)):
        return None
    with open(path) as f:
        return json.load(f)


def tf_keras_copy(build, weights):
    """The pair's model built in tf_keras, with the baseline's weights."""
    model = build(0, keras=tf_keras)
    model.set_weights(weights)
    return model


def run_pair(pair, args):
    load, build, lr, batch, max_epochs = fp.PAIRS[pair]
    (x, y), (xt, yt), about = load(args)
    if args.smoke:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
    t0 = time.time()
    base, base_epochs = fp.cached_baseline(pair, build, x, y, lr, batch, max_epochs, args)
    weights = base.get_weights()
    float_acc = float(base.evaluate(xt, yt, verbose=0)[1])
    twin = tf_keras_copy(build, weights)
    gap = float(np.max(np.abs(twin.predict(xt[:256], verbose=0)
                              - base.predict(xt[:256], verbose=0))))
    if gap > 1e-3:
        raise SystemExit(f"{pair}: the tf_keras copy computes something else (max output "
                         f"difference {gap:.2e}): the two builders differ")
    epochs = (1, 1, 1) if args.smoke else (2, 2, 1)
    out = {"pair": pair, "about": about, "model": base.name, "compiled_rate": lr,
           "batch": batch, "baseline_epochs": base_epochs, "float_accuracy": float_acc,
           "phase_epochs": epochs, "policy": args.policy, "tf_keras_copy_gap": gap,
           "rows": {}}
    before = existing(pair, args)
    if before is not None:
        same = {k: out[k] for k in ("float_accuracy", "policy")}
        same["phase_epochs"] = list(epochs)  # as JSON has it
        if any(before[k] != v for k, v in same.items()):
            raise SystemExit(f"{pair}: benchmarks/results/accuracy_pairs_{pair}.json was run "
                             f"with another baseline or plan ({ {k: before[k] for k in same} } "
                             f"vs {same}): run every row again (no --rows)")
        out = before
        out.setdefault("row_commands", {r: before["command"] for r in before["rows"]})
    command = " ".join(["python"] + sys.argv)
    out.setdefault("row_commands", {}).update({r: command for r in args.rows})
    out["rows"].update({  # --first-seed N keeps the row's runs of the seeds below N
        r: [run for run in out["rows"].get(r, []) if run["seed"] < args.first_seed]
        for r in args.rows})
    with tempfile.TemporaryDirectory() as d:
        out["float_int8_accuracy"], out["float_int8_gzip"] = fp.int8_accuracy(
            base, xt, yt, d, "base", representative=x[:256])
        print(pair, "float", round(float_acc, 4), "int8", round(out["float_int8_accuracy"], 4),
              flush=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for row in args.rows:
                student = None
                if row != "tfmot":  # built first: a builder sets its own seed
                    student = fp.compiled(build(0), lr)
                    student.set_weights(weights)
                keras.utils.set_random_seed(seed + 1)  # data order, centroid initialization
                tf_keras.utils.set_random_seed(seed + 1)
                if row == "tfmot":
                    cfg = {"lr": lr, "batch": batch, "prune_epochs": epochs[0],
                           "clusters": 8, "cluster_epochs": epochs[1], "qat_epochs": epochs[2]}
                    steps = -(-len(x) // batch)
                    model = ot.tfmot_pcqat(twin, x, y, cfg, steps, from_logits=True,
                                           fine_lr=lr)
                else:
                    p, c, q = fp.POLICIES[args.policy](lr)
                    if row in CONVDENSE:
                        p, c = dict(p, layers=convdense), dict(c, layers=convdense)
                    model = fp.compress(student, x, y, batch, epochs, (p, c, q),
                                        distill=distill_of(row)).model
                acc, gz = fp.int8_accuracy(model, xt, yt, d, f"{row}_{seed}")
                out["rows"][row].append({"seed": seed, "int8_accuracy": acc, "gzip_bytes": gz})
                print(pair, row, seed, round(acc, 4), gz, flush=True)
    out.setdefault("row_seconds", {}).update(
        {r: round(time.time() - t0) for r in args.rows})  # of the run that made them
    out["seconds"] = round(time.time() - t0)
    out["seeds"] = {r: len(runs) for r, runs in out["rows"].items()}  # rows may differ
    return out


def table(results_dir):
    pairs = fp.read_pairs(results_dir, "accuracy_pairs")
    if not pairs:
        return ""

    def mean(r, row, key="int8_accuracy"):
        return statistics.mean(run[key] for run in r["rows"][row])

    def cell(r, row):
        v = [run["int8_accuracy"] for run in r["rows"][row]]
        return (f"{mean(r, row) * 100:.2f}"
                + (f" ({min(v) * 100:.1f}-{max(v) * 100:.1f})" if len(v) > 1 else ""))

    lines = ["# What compression costs, per pair (issue 13)", "",
             "Prune 50 % (2) -> Cluster 8 sparsity-preserving (2) -> PCQAT (1) from one "
             "converged FP32 baseline per pair (finetune_policy.py's: EarlyStopping on a 10 % "
             "validation split; ResNet-8's with a decaying rate, finetune_policy.PLATEAU); "
             "int8 accuracy in LiteRT on the test split, mean over seeds (min-max); gzip of "
             "the int8 `.tflite`. ours: collaborative_fit; + distill: "
             "`distill=True`; tfmot: the same plan hand-written with tfmot at the compiled "
             "rate; policy: the rates of our rows (finetune_policy.py's names; `compiled` is "
             "the library's default since December 2026, `tenth` the one before). Command: "
             "`python benchmarks/accuracy_pairs.py` (each pair's file says how it was run; "
             "rows of one pair may hold different numbers of seeds, its `seeds`).",
             "",
             "| pair | FP32 (epochs) | FP32 PTQ int8 | ours: policy | ours int8 | "
             "ours + distill int8 | tfmot int8 | ours - FP32 | best ours - tfmot | "
             "gzip ours / tfmot |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for pair, r in pairs.items():
        if not all(row in r["rows"] for row in ROWS):
            continue
        cells = [cell(r, row) for row in ROWS]
        best = max(mean(r, "ours"), mean(r, "ours_distill"))
        lines.append(
            f"| {pair}: {r['model']}, {r['about']} | {r['float_accuracy'] * 100:.2f} "
            f"({r['baseline_epochs']}) | {r['float_int8_accuracy'] * 100:.2f} | "
            f"{r['policy']} | " + " | ".join(cells)
            + f" | {(mean(r, 'ours') - r['float_accuracy']) * 100:+.2f} | "
            f"{(best - mean(r, 'tfmot')) * 100:+.2f} | "
            f"{mean(r, 'ours', 'gzip_bytes'):.0f} / {mean(r, 'tfmot', 'gzip_bytes'):.0f} B |")
    extra = {pair: r for pair, r in pairs.items()
             if all(row in r["rows"] for row in ("ours", "tfmot") + CONVDENSE)}
    if extra:
        lines += ["", "On tfmot's layers: our rows again with depthwise kernels left out of Prune "
                  "and Cluster (`layers=` Conv2D and Dense only, as the tfmot rows prune and "
                  "cluster; every layer is still quantized), same baseline, same plan "
                  "(`--rows ours_convdense ours_distill_convdense`).", "",
                  "| pair | FP32 | ours int8 (all layers) | ours, Conv2D/Dense | "
                  "ours + distill, Conv2D/Dense | tfmot int8 | best Conv2D/Dense - tfmot | "
                  "gzip ours all / Conv2D/Dense / tfmot |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for pair, r in extra.items():
            cells = [cell(r, row) for row in ("ours",) + CONVDENSE + ("tfmot",)]
            best = max(mean(r, row) for row in CONVDENSE)
            lines.append(
                f"| {pair} | {r['float_accuracy'] * 100:.2f} | " + " | ".join(cells)
                + f" | {(best - mean(r, 'tfmot')) * 100:+.2f} | "
                + " / ".join(f"{mean(r, row, 'gzip_bytes'):.0f}"
                             for row in ("ours", CONVDENSE[0], "tfmot")) + " B |")
    settings = {pair: [row for row in r["rows"] if row.startswith("ours_distill_T")]
                for pair, r in pairs.items() if {"ours", "ours_distill"} <= set(r["rows"])}
    if any(settings.values()):
        from keras_colopt.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT

        lines += ["", f"Distillation settings (`--distill-settings T,W`): ours + distill with "
                  f"Distill(temperature=T, weight=W), all layers, same baseline and plan; the "
                  f"default is T={DEFAULT_TEMPERATURE:g}, W={DEFAULT_WEIGHT:g} (the "
                  f"`ours + distill` column above).", "",
                  "| pair | FP32 | no distillation | default | setting: int8 |",
                  "|---|---:|---:|---:|---|"]
        for pair, rows in settings.items():
            if rows:
                r = pairs[pair]
                lines.append(f"| {pair} | {r['float_accuracy'] * 100:.2f} | {cell(r, 'ours')} | "
                             f"{cell(r, 'ours_distill')} | "
                             + "; ".join(f"{row[len('ours_distill_'):]}: {cell(r, row)}"
                                         for row in rows) + " |")
    lines += [f"\n{pair}: {r['note']}" for pair, r in pairs.items() if r.get("note")]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "accuracy_pairs.md"), "w") as f:
        f.write(text)
    return text


def main():
    ap = argparse.ArgumentParser()
    fp.pair_arguments(ap)
    ap.add_argument("--policy", choices=list(fp.POLICIES), default=fp.DEFAULT,
                    help="the fine-tuning policy of our rows (default: the library's)")
    ap.add_argument("--rows", nargs="+", choices=ROWS + CONVDENSE,
                    help="the rows to run (default: ours, ours_distill, tfmot, or none with "
                    "--distill-settings); other rows "
                    "are added to the pair's existing result file if its baseline and plan "
                    "match")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="the first fine-tuning seed: with N > 0, the rows' runs with seeds "
                    "below N in the pair's file are kept and these added to them")
    ap.add_argument("--distill-settings", nargs="+", default=[], metavar="T,W",
                    help="more rows: ours + distill with Distill(temperature=T, weight=W), "
                    "added to the pair's file as --rows are")

    def rows(a):
        a.rows = (a.rows or ([] if a.distill_settings else list(ROWS))) + [
            distill_row(v) for v in a.distill_settings]
    fp.run_pairs(ap, "accuracy_pairs", run_pair, table, adjust=rows)


if __name__ == "__main__":
    main()
