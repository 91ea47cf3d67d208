"""search() against explore()'s default PCQAT, on Ethos-U55-128 (issue 29).

Two held-out models, trained the way users train them (finetune_heldout.py's decay
baselines, kept in benchmarks/out/: a cosine decay to 0, then compiled at Adam(1e-3)):

  model                                    data
  DS-CNN (the origin's KWS model)          synthesized keywords, 6000 train / 2440 test
  MobileNet v1 0.25 (32x32x1)              Fashion-MNIST, 6000 train / 10,000 test

Side by side in one run, per model, target EthosU("ethos-u55-128"):
  default   explore(leaves=["PTQ", "PCQAT"]) at its defaults (Prune 50 % (2), Cluster 8 (2),
            Quantize (2)): what a user gets without searching;
  search    colopt.search(..., max_accuracy_drop=0.01, budget=N) over the default
            SearchSpace: the Pareto front, the chosen point (the smallest within 1 point of
            FP32), and what it trained against what a grid over the space would.

Reported: int8 accuracy vs FP32; the weights Vela encodes vs the float model's (4 bytes a
weight), vs PTQ int8 and vs the default PCQAT; Vela's latency; epochs. The goal the issue
set: <= 1 point below FP32, weights >= 20x smaller than float and >= 2x smaller than the
default PCQAT, in fewer epochs than the grid.

Run: python benchmarks/search.py [--models dscnn mobilenet] [--budget 24]
     python benchmarks/search.py --smoke        (checks the script: small data, 3 trials)
Writes benchmarks/results/search.json and search.md; the studies and their files stay in
benchmarks/out/search/<model>/ (search.db: the same command again resumes them).
"""

import json
import logging
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import keras_colopt as colopt  # noqa: E402
import ethos_u  # noqa: E402

MODELS = ethos_u.MODELS  # DS-CNN and MobileNet v1 0.25, their decay baselines


def run(name, args, folder):
    (x, y), (xt, yt), about, model, fp32 = ethos_u.held_out(name, args)
    target = colopt.targets.EthosU("ethos-u55-128")
    params = sum(int(w.numpy().size) for w in model.weights)
    t0 = time.time()
    kw = ethos_u.tree_phases(args)
    tree = colopt.explore(model, x, y, validation_data=(xt, yt), leaves=["PTQ", "PCQAT"],
                          out_dir=os.path.join(folder, name, "explore"), target=target,
                          batch_size=64, latency_runs=5, **kw)
    explore_s = time.time() - t0
    leaves = {r.name: r for r in tree.leaves}
    t0 = time.time()
    space = colopt.SearchSpace(epochs=(1,), clusters=(4, 8), sparsity=(0.5, 0.75)) \
        if args.smoke else colopt.SearchSpace()
    found = colopt.search(model, x, y, validation_data=(xt, yt),
                          out_dir=os.path.join(folder, name, "search"), target=target,
                          max_accuracy_drop=0.01, budget=args.budget, space=space,
                          batch_size=64, latency_runs=5)
    search_s = time.time() - t0

    def leaf(r):
        return {"int8_accuracy": r.int8_accuracy, "weight_bytes": r.target_weight_bytes,
                "latency_ms": r.target_latency_ms, "epochs": r.epochs, "tflite": r.tflite}

    within = [p for p in found.front if fp32 - p.int8_accuracy <= 0.01]
    return {"model": name, "about": about, "fp32_accuracy": fp32, "params": params,
            "float_weight_bytes": 4 * params,
            "ptq": leaf(leaves["PTQ"]), "default_pcqat": leaf(leaves["PCQAT"]),
            "explore_seconds": round(explore_s), "search_seconds": round(search_s),
            "search": found.as_dict(),
            "smallest_within_1pt": None if not within else
            min(within, key=lambda p: p.deployed["weight_bytes"]).as_dict()}


def _x(a, b):
    return "-" if not a or not b else f"{a / b:.2f}x"


def table(results) -> str:
    out = ["# search() against explore()'s default PCQAT, on Ethos-U55-128 (issue 29)", "",
           f"Vela {results['vela']}; {results['machine']}. Weights: what Vela encodes for the "
           "NPU; float: 4 bytes a weight. Latency: Vela's estimate. Accuracy: the int8 "
           "`.tflite` in LiteRT on the test set (the search's validation data).", ""]
    for m in results["models"]:
        s = m["search"]
        fw = m["float_weight_bytes"]
        d = m["default_pcqat"]
        out += [f"## {m['model']}: {m['about']}", "",
                f"FP32 (Keras) {100 * m['fp32_accuracy']:.2f} %, {m['params']:,} weights "
                f"({fw:,} B as float). explore (PTQ, PCQAT) {m['explore_seconds']} s; "
                f"search {m['search_seconds']} s (this command), {s['trials_study']} trials "
                f"trained, {s['epochs_study']} epochs (a grid over the space: "
                f"{s['grid_points']} points, {s['epochs_grid']:,} epochs).", "",
                "| model | settings | int8 acc | vs FP32 | weights B | vs float | vs PTQ "
                "| vs default PCQAT | latency us | epochs |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def row(label, settings, acc, wb, lat, epochs):
            return (f"| {label} | {settings} | {100 * acc:.2f} | "
                    f"{100 * (acc - m['fp32_accuracy']):+.2f} pt | {wb:,} | "
                    f"{fw / wb:.1f}x smaller | {_x(wb, m['ptq']['weight_bytes'])} | "
                    f"{_x(wb, d['weight_bytes'])} | {1e3 * lat:.1f} | {epochs} |")

        out.append(row("PTQ int8", "-", m["ptq"]["int8_accuracy"], m["ptq"]["weight_bytes"],
                       m["ptq"]["latency_ms"], 0))
        out.append(row("default PCQAT (explore)", "prune 50%, 8 clusters per tensor, 2 epochs "
                       "a phase", d["int8_accuracy"], d["weight_bytes"], d["latency_ms"],
                       d["epochs"]))
        for p in s["front"]:
            label = p["name"] + (" **chosen**" if s["chosen"] and s["chosen"]["name"] ==
                                 p["name"] else "")
            out.append(row(f"front: {label}", _settings(p["settings"]), p["int8_accuracy"],
                           p["deployed"]["weight_bytes"], p["deployed"]["latency_ms"], "-"))
        out.append("")
        if s["chosen"] is None:
            out += [f"No point within 1 point of FP32: {'; '.join(s['missed'].values())}", ""]
    return "\n".join(out) + "\n"


def _settings(s):
    if s["pruning"] == "none":
        return "no compression (PTQ int8)"
    return (f"prune {s['pruning']}{' (continues ' + s['continued_from'] + ')' if s.get('continued_from') else ''}, "
            f"{s['clusters']} clusters {'per channel' if s['per_channel'] else 'per tensor'}, "
            f"{'every layer' if s['leave_out'] == 'none' else s['leave_out'] + ' left out'}, "
            f"{s['epochs']} epochs a phase")


def main():
    ap = ethos_u.arguments()
    ap.add_argument("--budget", type=int, default=24)
    args = ap.parse_args()
    if args.smoke:  # a check of the script: its results go to a temporary folder
        import tempfile

        args.budget = min(args.budget, 3)
        args.results = tempfile.mkdtemp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("keras_colopt").setLevel(logging.INFO)
    from importlib.metadata import version

    stem = "search_smoke" if args.smoke else "search"
    folder = os.path.join(HERE, "out", stem)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, stem + ".json")
    results = {"vela": version("ethos-u-vela"), "optuna": version("optuna"), "models": [],
               "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if os.path.exists(path) and not args.smoke:  # one model per command: keep the others
        with open(path) as f:
            results["models"] = [m for m in json.load(f)["models"]
                                 if m["model"] not in args.models]
    for name in args.models:
        results["models"].append(run(name, args, folder))
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.results, stem + ".md"), "w") as f:
            f.write(table(results))
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
