"""collaborative_fit against the same pipeline hand-written with tfmot, timed alone.

The PCQAT path (Prune -> sparsity-preserving Cluster -> PCQAT, the epochs of
origin_tables.py's settings) from one baseline: A hand-written tfmot (as its tutorials
do), B collaborative_fit without its callbacks, C collaborative_fit with CompressionMetrics
+ InvariantGuard, in the order A B C C B A (a linear drift of the machine cancels). Each
phase's epochs are timed apart (first epoch, with tf.function tracing, to last epoch end)
from what happens outside them (copies, wrapping, the dry run, tf.data teardown). The
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

PHASES = ("prune", "cluster", "pcqat")


class PhaseClock(ot.keras.callbacks.Callback):
    """Seconds spent inside each phase's epochs (one fit() per phase in A, B and C)."""

    def __init__(self):
        super().__init__()
        self.seconds, self._t = [], None

    def on_train_begin(self, logs=None):
        self.seconds.append(0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds[-1] += time.perf_counter() - self._t


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
    phase_s = {"A": [], "B": [], "C": []}
    for _ in range(args.reps):
        for cond in ("A", "B", "C", "C", "B", "A"):
            clock = PhaseClock()
            t = time.perf_counter()
            if cond == "A":
                ot.tfmot_pcqat(baseline, x, y, cfg, steps, callbacks=[clock])
            else:
                ot.ours_pcqat(baseline, x, y, cfg, callbacks_on=cond == "C", callbacks=[clock])
            times[cond].append(time.perf_counter() - t)
            assert len(clock.seconds) == len(PHASES), clock.seconds
            phase_s[cond].append(dict(zip(PHASES, clock.seconds)))
            print(f"timing {cond}: {times[cond][-1]:.1f} s, epochs by phase "
                  f"{[round(v, 1) for v in clock.seconds]}", flush=True)
            ot.keras.backend.clear_session()
            gc.collect()
    # Each condition's mean over its symmetric positions cancels a linear drift.
    mean = {k: statistics.mean(v) for k, v in times.items()}
    phase_mean = {k: {p: statistics.mean(r[p] for r in v) for p in PHASES}
                  for k, v in phase_s.items()}
    outside = {k: mean[k] - sum(phase_mean[k].values()) for k in mean}
    result = {"experiment": args.experiment, "about": about["dataset"], "reps": args.reps,
              "epochs": {k: cfg[k] for k in ("prune_epochs", "cluster_epochs", "qat_epochs")},
              "clusters": cfg["clusters"], "batch": cfg["batch"], "steps_per_epoch": steps,
              "order": "A B C C B A", "runs_s": times, "mean_s": mean,
              "phase_epochs_s": phase_s, "phase_epochs_mean_s": phase_mean,
              "outside_epochs_mean_s": outside,
              "phase_ratio_ours_no_callbacks_vs_tfmot": {
                  p: phase_mean["B"][p] / phase_mean["A"][p] for p in PHASES},
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
    lines += ["", f"Callback overhead (C / B): {mean['C'] / mean['B']:.3f}.", "",
              "Inside each phase's epochs, and outside them (copies, wrapping, the "
              "quantization dry run, tf.data teardown), means:", "",
              "| | " + " | ".join(f"{p} epochs" for p in PHASES) + " | outside epochs |",
              "|---|" + "---:|" * (len(PHASES) + 1)]
    for k in ("A", "B", "C"):
        lines.append(f"| {k} | " + " | ".join(
            f"{phase_mean[k][p]:.1f} s ({phase_mean[k][p] / phase_mean['A'][p]:.3f})"
            for p in PHASES) + f" | {outside[k]:.1f} s |")
    with open(os.path.join(ot.HERE, "results", name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
