"""Set-up time of the Keras 3 engine's Cluster phase (the initial centroids), old routine
against new, side by side in one run.

For each model (a Keras 3 MobileNet v1 alpha 0.25 on 96x96x3, 10 classes, and the DS-CNN
of origin_tables, both freshly initialised: no downloads here) and each setting (per tensor
or per output channel, 8 or 16 clusters; and 8 clusters with zero kept apart after a 50%
magnitude pruning, as a Cluster after Prune does), computes the centroids of every kernel
the engine's Cluster phase touches (`apply.select_layers`), the way `apply_phase` does:

- old: `OLD_init_centroids`, a verbatim copy of the routine the engine used before
  (k-means++ seeding, then up to 30 Lloyd iterations, on N x k float64 distance matrices),
  called channel by channel as `apply_phase` did (`OLD_kernel_centroids`);
- new: `compress.kernel_centroids(..., "kmeans++", ...)`, the exact 1-D k-means of
  `keras_colopt.kmeans`, every channel at once.

Times are the best of `--reps` (alternating old and new, so machine noise hits both), the
SSE is the within-cluster sum of squares over every touched kernel (each weight at its
nearest centroid; the zeros left out when kept apart). Writes
benchmarks/results/kmeans_setup.{json,md}.

Run: python benchmarks/kmeans_setup.py [--reps 3]
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_colopt as colopt  # noqa: E402
import origin_tables  # noqa: E402  (the DS-CNN builder)
from keras_colopt.engines.keras3 import apply, compress  # noqa: E402
from keras_colopt.kmeans import sse  # noqa: E402


# ----------------------------------------------------------------- the old routine (a copy)

def OLD_init_centroids(values, k, method, rng):
    """The Keras 3 engine's centroid routine before keras_colopt.kmeans (verbatim)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        return np.zeros(k, np.float32)
    lo, hi = float(values.min()), float(values.max())
    if method == "linear" or values.size < k:
        return np.linspace(lo, hi, k).astype(np.float32)
    if method == "random":
        return np.sort(rng.uniform(lo, hi, k)).astype(np.float32)
    if method == "density":
        return np.quantile(values, np.linspace(0, 1, k)).astype(np.float32)
    centers = [values[rng.integers(values.size)]]
    for _ in range(1, k):
        d = np.min(np.abs(values[:, None] - np.asarray(centers)[None]), axis=1) ** 2
        total = d.sum()
        centers.append(values[rng.integers(values.size)] if total == 0 else
                       values[rng.choice(values.size, p=d / total)])
    c = np.sort(np.asarray(centers))
    for _ in range(30):
        idx = np.argmin(np.abs(values[:, None] - c[None]), axis=1)
        new = np.array([values[idx == j].mean() if np.any(idx == j) else c[j]
                        for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c).astype(np.float32)


def OLD_kernel_centroids(view, k, method, rng, per_channel, skip_zeros):
    """apply_phase's loop before keras_colopt.kmeans: one channel at a time."""
    def centroids(values):
        kept = values[values != 0] if skip_zeros else values
        return OLD_init_centroids(kept, k, method, rng)
    return (np.stack([centroids(view[:, j]) for j in range(view.shape[1])])
            if per_channel else centroids(view))


# ------------------------------------------------------------------------------- models

def mobilenet():
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNet(input_shape=(96, 96, 3), alpha=0.25, weights=None,
                                        classes=10)


def ds_cnn():
    return origin_tables.ds_cnn(0, keras=keras)


def kernels(model, clusters, per_channel, pruned):
    """(name, view, per_channel) of each kernel a Cluster phase of the Keras 3 engine touches,
    as apply_phase sees it; `pruned`: half of each kernel zeroed by magnitude first."""
    phase = colopt.Cluster(clusters=clusters, epochs=1, per_channel=per_channel)
    touched, _ = apply.select_layers(model, phase, "cluster")
    layers = dict(apply.walk(model))
    out = []
    for name in touched:
        layer = layers[name]
        view = np.asarray(compress.raw_kernel(layer).numpy()).reshape(
            -1, compress.view_channels(layer))
        if pruned:
            view = np.where(np.abs(view) < np.median(np.abs(view)), 0, view).astype(view.dtype)
        out.append((name, view, per_channel and not isinstance(layer, keras.layers.Dense)))
    return out


def total_sse(items, centroids, skip_zeros):
    s = 0.0
    for (_, view, per_channel), c in zip(items, centroids):
        rows = view.T if per_channel else view.reshape(1, -1)
        c = c if per_channel else c[None]
        s += float(np.sum(sse(rows, c, rows != 0 if skip_zeros else None)))
    return s


def run(items, k, skip_zeros, fn):
    rng = np.random.default_rng(0)  # as apply_phase: one generator for the phase
    t0 = time.perf_counter()
    out, per_layer = [], []
    for _, view, per_channel in items:
        t = time.perf_counter()
        out.append(fn(view, k, "kmeans++", rng, per_channel, skip_zeros))
        per_layer.append(time.perf_counter() - t)
    return time.perf_counter() - t0, out, per_layer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kmeans_setup"))
    args = ap.parse_args()
    settings = [(pc, clusters, False) for pc in (False, True) for clusters in (8, 16)]
    settings += [(pc, 8, True) for pc in (False, True)]
    rows = []
    for model_name, build in (("MobileNet v1 0.25 (96x96x3)", mobilenet), ("DS-CNN", ds_cnn)):
        model = build()
        for per_channel, clusters, pruned in settings:
            items = kernels(model, clusters, per_channel, pruned)
            k = clusters - 1 if pruned else clusters  # zero is one of the clusters
            times = {"old": [], "new": []}
            for _ in range(args.reps):
                for which, fn in (("old", OLD_kernel_centroids),
                                  ("new", compress.kernel_centroids)):
                    dt, cents, per_layer = run(items, k, pruned, fn)
                    times[which].append(dt)
                    if which == "old":
                        old_c, old_layers = cents, per_layer
                    else:
                        new_c, new_layers = cents, per_layer
            old_sse, new_sse = total_sse(items, old_c, pruned), total_sse(items, new_c, pruned)
            big = max(range(len(items)), key=lambda i: items[i][1].size)
            row = {
                "model": model_name, "per_channel": per_channel, "clusters": clusters,
                "preserve_sparsity": pruned, "k_solved": k, "kernels": len(items),
                "weights": int(sum(v.size for _, v, _ in items)),
                "old_s": min(times["old"]), "new_s": min(times["new"]),
                "old_s_all": times["old"], "new_s_all": times["new"],
                "old_sse": old_sse, "new_sse": new_sse,
                "largest": {"layer": items[big][0], "shape": list(items[big][1].shape),
                            "old_s": old_layers[big], "new_s": new_layers[big]},
            }
            assert new_sse <= old_sse * (1 + 1e-9), row
            rows.append(row)
            print(f"{model_name:28s} {'per channel' if per_channel else 'per tensor':11s} "
                  f"clusters={clusters:2d}{' zeros kept' if pruned else '':11s} "
                  f"old {row['old_s']:.3f} s  new {row['new_s']:.3f} s  "
                  f"SSE {old_sse:.5g} -> {new_sse:.5g}", flush=True)
    meta = {"python": platform.python_version(), "numpy": np.__version__,
            "keras": keras.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "reps": args.reps}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table(rows, meta))


def table(rows, meta) -> str:
    lines = [
        "# Cluster phase set-up (initial centroids), Keras 3 engine: old vs new",
        "",
        "`python benchmarks/kmeans_setup.py` (best of "
        f"{meta['reps']}, old and new alternating; {meta['cpus']} CPU cores shared with "
        f"other work; numpy {meta['numpy']}, Keras {meta['keras']}). Old: k-means++ seeding "
        "and up to 30 Lloyd iterations, channel by channel (`OLD_init_centroids`, a copy of "
        "the routine replaced). New: exact 1-D k-means, `keras_colopt.kmeans.kmeans_1d`, "
        "every channel at once. Freshly initialised models (no trained weights can be "
        "downloaded here). SSE: within-cluster sum of squares over every kernel the phase "
        "touches; \"zeros kept\": half of each kernel pruned by magnitude, zero one of the "
        "clusters (the others fitted to the non-zero weights, k = clusters - 1).",
        "",
        "| model | granularity | clusters | kernels (weights) | old s | new s | speed-up "
        "| old SSE | new SSE | new/old SSE | largest kernel: old s / new s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = "per channel" if r["per_channel"] else "per tensor"
        c = f"{r['clusters']}" + (" (zeros kept)" if r["preserve_sparsity"] else "")
        big = r["largest"]
        lines.append(
            f"| {r['model']} | {g} | {c} | {r['kernels']} ({r['weights']:,}) "
            f"| {r['old_s']:.3f} | {r['new_s']:.3f} | {r['old_s'] / r['new_s']:.1f}x "
            f"| {r['old_sse']:.5g} | {r['new_sse']:.5g} | {r['new_sse'] / r['old_sse']:.4f} "
            f"| {big['layer']} {tuple(big['shape'])}: {big['old_s']:.3f} / {big['new_s']:.3f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
