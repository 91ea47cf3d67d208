"""Per-epoch overhead of CompressionMetrics + InvariantGuard on the demo model.

For the demo CNN on the embedded digits data, wrapped as in each phase of the
demo (plain, pruning, sparsity-preserving clustering, PCQAT), time epochs of
the same fit without the callbacks (A) and with them (B), alternating
A B A B so machine noise hits both alike. Writes
benchmarks/results/callback_overhead.{json,md}.

Then times the whole demo collaborative_fit with and without them.

Run: python benchmarks/callback_overhead.py [--reps 10] [--epochs 3] [--whole-reps 3]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.callbacks import CompressionMetrics, InvariantGuard  # noqa: E402
from keras_colopt.engines import tfmot as engine  # noqa: E402
from keras_colopt.engines.tfmot import TfmotEngine  # noqa: E402  (tf_keras demo CNN)

HERE = os.path.dirname(os.path.abspath(__file__))


class EpochTimer(keras.callbacks.Callback):
    """Wall time from epoch begin to epoch end, placed last so it includes the other
    callbacks' on_epoch_end."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def variants(x, y):
    """The demo model wrapped as in each phase, trained a little so the wrappers hold state."""
    plan = colopt.resolve([colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=2),
                           colopt.Cluster(clusters=8, epochs=1), colopt.Quantize(epochs=1)])
    base = TfmotEngine().demo_model()
    cfg = engine.compile_config(base)
    current = engine.clone_model(base)
    steps = -(-len(x) // 32)
    for planned in plan:
        current, companions, _ = engine.apply_phase(current, planned, steps)
        engine.compile_like(current, cfg)
        current.fit(x, y, batch_size=32, epochs=planned.epochs, verbose=0, callbacks=companions)
        yield planned.label, current, companions


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--whole-reps", type=int, default=3)
    args = p.parse_args()
    (x, y), _ = data.load_digits()
    rows = []
    for label, model, companions in variants(x, y):
        times = {"A": [], "B": []}
        with tempfile.TemporaryDirectory() as logs:
            metrics = CompressionMetrics(log_dir=logs)
            guard = InvariantGuard()  # expectations read from the wrappers
            for _ in range(args.reps):
                for cond in ("A", "B"):
                    timer = EpochTimer()
                    extra = [metrics, guard] if cond == "B" else []
                    model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=0,
                              callbacks=list(companions) + extra + [timer])
                    times[cond] += timer.times
        a, b = statistics.median(times["A"]), statistics.median(times["B"])
        rows.append({"model": label, "epochs_per_condition": len(times["A"]),
                     "median_epoch_s_without": a, "median_epoch_s_with": b,
                     "ratio": b / a, "overhead_ms_per_epoch": 1000 * (b - a)})
        print(f"{label:<32} without {1000 * a:7.1f} ms  with {1000 * b:7.1f} ms  "
              f"ratio {b / a:.3f}", flush=True)
    # The whole demo run (25 epochs over 4 phases), with and without the two callbacks.
    # Order A B B A per rep cancels drift; the time spent inside the callbacks' epoch-end
    # hooks is also measured directly, which is far less noisy than the difference.
    whole = {"A": [], "B": []}
    inside = []
    phases = [colopt.Train(epochs=15), colopt.Prune(sparsity=0.5, epochs=4),
              colopt.Cluster(clusters=8, epochs=3), colopt.Quantize(epochs=3)]
    hooks = [(CompressionMetrics, CompressionMetrics.on_epoch_end),
             (InvariantGuard, InvariantGuard.on_epoch_end)]

    def timed(hook):
        def run(self, *a, **k):
            t = time.perf_counter()
            try:
                return hook(self, *a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return run

    for _ in range(args.whole_reps):
        for cond in ("A", "B", "B", "A"):
            spent = [0.0]
            for cls, hook in hooks:
                cls.on_epoch_end = timed(hook)
            t = time.perf_counter()
            colopt.collaborative_fit(TfmotEngine().demo_model(), x, y, phases=phases, batch_size=32,
                                     verbose=0, compression_metrics=cond == "B",
                                     invariant_guard=cond == "B")
            whole[cond].append(time.perf_counter() - t)
            for cls, hook in hooks:
                cls.on_epoch_end = hook
            if cond == "B":
                inside.append(spent[0] / whole[cond][-1])
    wa, wb = statistics.median(whole["A"]), statistics.median(whole["B"])
    share = statistics.median(inside)
    print(f"whole demo collaborative_fit  without {wa:.2f} s  with {wb:.2f} s  "
          f"ratio {wb / wa:.3f}; inside the callbacks {100 * share:.1f}% of the run",
          flush=True)
    result = {
        "benchmark": "callback_overhead",
        "what": "median epoch wall time of the demo model (digits, 1437 samples, batch 32, "
                "45 steps/epoch) without (A) and with (B) CompressionMetrics(log_dir, "
                "histograms=True) + InvariantGuard(), A B A B",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "tensorflow": tf.__version__},
        "reps": args.reps, "epochs_per_fit": args.epochs, "rows": rows,
        "whole_demo_run": {"reps": args.whole_reps, "order": "A B B A",
                           "median_s_without": wa, "median_s_with": wb, "ratio": wb / wa,
                           "share_of_run_inside_callbacks": share, "runs_s": whole},
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "callback_overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# CompressionMetrics + InvariantGuard overhead per epoch (demo model)", "",
             f"Command: `python benchmarks/callback_overhead.py --reps {args.reps} "
             f"--epochs {args.epochs}`; {result['machine']['cpus']} CPUs, "
             f"TensorFlow {tf.__version__}. {result['what']}.", "",
             "| model as in phase | epoch without | epoch with | ratio | overhead |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {1000 * r['median_epoch_s_without']:.1f} ms "
                     f"| {1000 * r['median_epoch_s_with']:.1f} ms | {r['ratio']:.3f} "
                     f"| {r['overhead_ms_per_epoch']:.1f} ms |")
    lines += ["", f"Whole demo `collaborative_fit` (Train 15 -> Prune 4 -> Cluster 3 -> PCQAT 3, "
              f"tracing and re-wrapping included), median of {2 * args.whole_reps} runs each, "
              f"order A B B A: {wa:.2f} s without, {wb:.2f} s with the callbacks, "
              f"ratio {wb / wa:.3f}. Time spent inside the callbacks' epoch-end hooks, "
              f"measured directly: {100 * share:.1f}% of the run."]
    with open(os.path.join(HERE, "results", "callback_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
