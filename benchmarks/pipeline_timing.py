"""collaborative_fit against the same pipeline hand-written with tfmot, timed alone.

The PCQAT path (Prune -> sparsity-preserving Cluster -> PCQAT, the epochs of
origin_tables.py's settings) from one baseline: A hand-written tfmot (as its tutorials
do), B collaborative_fit without its callbacks, C collaborative_fit with CompressionMetrics
+ InvariantGuard, in the order A B C C B A (a linear drift of the machine cancels). The
baseline is trained one epoch only: the pipeline's speed does not depend on its accuracy.
Run it on a quiet machine. Writes benchmarks/results/pipeline_timing_<experiment>.{md,json}.

Run: python benchmarks/pipeline_timing.py fashion|kws [--reps 1]
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import origin_tables as ot  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL, imports TF)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=sorted(ot.EXPERIMENTS))
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    cfg = dict(ot.EXPERIMENTS[args.experiment])
    (x, y), _, about = cfg["data"](cfg["train"])
    steps = -(-len(x) // cfg["batch"])
    baseline = ot.compiled(cfg["model"](), cfg["lr"])
    baseline.fit(x, y, batch_size=cfg["batch"], epochs=1, verbose=0)
    times = {"A": [], "B": [], "C": []}
    for _ in range(args.reps):
        for cond in ("A", "B", "C", "C", "B", "A"):
            t = time.perf_counter()
            if cond == "A":
                ot.tfmot_pcqat(baseline, x, y, cfg, steps)
            else:
                ot.ours_pcqat(baseline, x, y, cfg, callbacks_on=cond == "C")
            times[cond].append(time.perf_counter() - t)
            print(f"timing {cond}: {times[cond][-1]:.1f} s", flush=True)
            ot.keras.backend.clear_session()
            gc.collect()
    # Each condition's mean over its symmetric positions cancels a linear drift.
    mean = {k: statistics.mean(v) for k, v in times.items()}
    result = {"experiment": args.experiment, "about": about["dataset"], "reps": args.reps,
              "epochs": {k: cfg[k] for k in ("prune_epochs", "cluster_epochs", "qat_epochs")},
              "clusters": cfg["clusters"], "batch": cfg["batch"], "steps_per_epoch": steps,
              "order": "A B C C B A", "runs_s": times, "mean_s": mean,
              "ratio_ours_no_callbacks_vs_tfmot": mean["B"] / mean["A"],
              "ratio_ours_with_callbacks_vs_tfmot": mean["C"] / mean["A"],
              "callback_overhead": mean["C"] / mean["B"],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "tensorflow": ot.tf.__version__}}
    os.makedirs(os.path.join(ot.HERE, "results"), exist_ok=True)
    name = f"pipeline_timing_{args.experiment}"
    with open(os.path.join(ot.HERE, "results", name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# collaborative_fit vs hand-written tfmot: {args.experiment}", "",
             f"Command: `python benchmarks/pipeline_timing.py {args.experiment} --reps "
             f"{args.reps}`; {os.cpu_count()} CPUs, TensorFlow {ot.tf.__version__}. "
             f"{about['dataset']}. PCQAT path: Prune {cfg['prune_epochs']} → Cluster "
             f"{cfg['clusters']} {cfg['cluster_epochs']} → PCQAT {cfg['qat_epochs']} epochs, "
             f"batch {cfg['batch']}, {steps} steps/epoch; order A B C C B A, means.", "",
             "| | runs | mean | ratio to A |", "|---|---|---:|---:|"]
    for k, label in (("A", "A: hand-written tfmot"), ("B", "B: collaborative_fit, no callbacks"),
                     ("C", "C: collaborative_fit + CompressionMetrics + InvariantGuard")):
        lines.append(f"| {label} | {', '.join(f'{v:.1f}' for v in times[k])} s | "
                     f"{mean[k]:.1f} s | {mean[k] / mean['A']:.3f} |")
    lines += ["", f"Callback overhead (C / B): {mean['C'] / mean['B']:.3f}."]
    with open(os.path.join(ot.HERE, "results", name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
