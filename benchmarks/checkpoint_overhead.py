"""Cost of per-epoch checkpoints: the demo's collaborative_fit with and without
`checkpoint_dir`, alternating A B B A so machine noise hits both alike.

Also measures directly the time spent inside the checkpoint writes, the size of one
checkpoint, and how long a rerun of a finished run takes to resume (open, rebuild the
last phase's wrappers, restore). Writes benchmarks/results/checkpoint_overhead.{json,md}.

Run: python benchmarks/checkpoint_overhead.py [--reps 3]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.checkpoint import RunCheckpoint  # noqa: E402
from keras_colopt.engines.tfmot import TfmotEngine  # noqa: E402  (tf_keras demo CNN)

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = [colopt.Train(epochs=15), colopt.Prune(sparsity=0.5, epochs=4),
          colopt.Cluster(clusters=8, epochs=3), colopt.Quantize(epochs=3)]


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    (x, y), (xt, yt) = data.load_digits()
    runs = {"A": [], "B": []}
    inside, sizes, resumes = [], [], []
    real_save = RunCheckpoint.save

    def timed_save(self, *a, **k):
        t = time.perf_counter()
        try:
            return real_save(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    RunCheckpoint.save = timed_save
    for _ in range(args.reps):
        for cond in ("A", "B", "B", "A"):
            spent = [0.0]
            folder = tempfile.mkdtemp(prefix="colopt-ckpt-bench-")
            kw = {"checkpoint_dir": folder} if cond == "B" else {}
            t = time.perf_counter()
            colopt.collaborative_fit(TfmotEngine().demo_model(), x, y, phases=PHASES, batch_size=32,
                                     validation_data=(xt, yt), verbose=0, **kw)
            runs[cond].append(time.perf_counter() - t)
            if cond == "B":
                inside.append(spent[0] / runs[cond][-1])
                sizes.append(folder_bytes(folder))
                t = time.perf_counter()  # rerun of the finished run: resume, nothing to train
                colopt.collaborative_fit(TfmotEngine().demo_model(), x, y, phases=PHASES, batch_size=32,
                                         validation_data=(xt, yt), verbose=0, **kw)
                resumes.append(time.perf_counter() - t)
            shutil.rmtree(folder, ignore_errors=True)
    RunCheckpoint.save = real_save
    a, b = statistics.median(runs["A"]), statistics.median(runs["B"])
    share = statistics.median(inside)
    epochs = sum(ph.epochs for ph in PHASES)
    print(f"demo collaborative_fit without {a:.2f} s, with checkpoints {b:.2f} s, ratio "
          f"{b / a:.3f}; inside the writes {100 * share:.1f}% of the run "
          f"({1000 * share * b / epochs:.1f} ms per epoch); checkpoint {max(sizes)} bytes; "
          f"resuming a finished run {statistics.median(resumes):.2f} s", flush=True)
    result = {
        "benchmark": "checkpoint_overhead",
        "what": "wall time of the demo's collaborative_fit (digits, 1437 samples, batch 32, "
                "Train 15 -> Prune 4 -> Cluster 3 -> PCQAT 3, validation each epoch) without "
                "(A) and with (B) checkpoint_dir, order A B B A",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "tensorflow": tf.__version__},
        "reps": args.reps, "runs_s": runs, "median_s_without": a, "median_s_with": b,
        "ratio": b / a, "share_of_run_inside_checkpoint_writes": share,
        "ms_per_checkpoint": 1000 * share * b / epochs, "checkpoint_folder_bytes": max(sizes),
        "resume_finished_run_s": statistics.median(resumes),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "checkpoint_overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# Per-epoch checkpoint overhead (demo run)", "",
             f"Command: `python benchmarks/checkpoint_overhead.py --reps {args.reps}`; "
             f"{result['machine']['cpus']} CPUs, TensorFlow {tf.__version__}. "
             f"{result['what']}; median of {2 * args.reps} runs each.", "",
             "| | without checkpoints | with checkpoints | ratio |", "|---|---:|---:|---:|",
             f"| whole run | {a:.2f} s | {b:.2f} s | {b / a:.3f} |",
             f"| range of the runs | {min(runs['A']):.2f}-{max(runs['A']):.2f} s "
             f"| {min(runs['B']):.2f}-{max(runs['B']):.2f} s | |", "",
             "The whole-run ratio is within this machine's run-to-run noise; the direct "
             "measurement below is the overhead to quote.", "",
             f"Time inside the checkpoint writes, measured directly: {100 * share:.1f}% of the "
             f"run, {result['ms_per_checkpoint']:.1f} ms per epoch. One checkpoint folder "
             f"(manifest, entry weights, model + optimizer state): {max(sizes):,} bytes. "
             f"Rerunning a finished run (open, rebuild the last phase, restore, nothing to "
             f"train): {result['resume_finished_run_s']:.2f} s."]
    with open(os.path.join(HERE, "results", "checkpoint_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
