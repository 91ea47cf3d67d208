"""Which learning rate the fine-tuning phases (Prune, Cluster, Quantize) should default to.

From one baseline (trained with the experiment's rate), builds the leaves the origin's
accuracy claims compare (Pruned+PTQ vs PQAT, Clustered+PTQ vs CQAT, per-tensor vs
per-channel CQAT) with every fine-tuning phase at each rate given, through the public API
(`learning_rate=` on each phase). Evidence for the library's default, not a table of record.
Writes benchmarks/results/finetune_lr_<experiment>.{md,json}.

Run: python benchmarks/finetune_lr.py kws --lrs 1e-3 3e-4 1e-4
     python benchmarks/finetune_lr.py kws --lrs 1e-4 --prune-lr 1e-3  (Prune at its own rate)
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import origin_tables as ot  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL, imports TF)

colopt = ot.colopt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=sorted(ot.EXPERIMENTS))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4])
    ap.add_argument("--prune-lr", type=float,
                    help="the Prune phase's rate (default: the row's rate, like the others)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="repeat each rate with this many fine-tuning seeds (data order, "
                         "centroid initialization); the baseline stays the same")
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("--train", type=int, help="training samples (subsample)")
    args = ap.parse_args()
    cfg = dict(ot.EXPERIMENTS[args.experiment])
    t0 = time.time()
    (x, y), (xt, yt), about = cfg["data"](args.train or cfg["train"])
    baseline = ot.compiled(cfg["model"](), cfg["lr"])
    baseline.fit(x, y, batch_size=cfg["batch"], epochs=cfg["baseline_epochs"], verbose=0)
    base_acc = float(baseline.evaluate(xt, yt, verbose=0)[1])
    print(f"baseline FP32 {base_acc:.4f}", flush=True)
    work = os.path.join(ot.OUT, f"finetune_lr_{args.experiment}{args.tag}")
    common = dict(validation_data=(xt, yt), batch_size=cfg["batch"], latency_runs=5,
                  representative_data=x[:256], verbose=0)
    rows = []
    for lr in args.lrs:
        for seed in range(args.seeds):
            t = time.time()
            prune = colopt.Prune(sparsity=0.5, epochs=cfg["prune_epochs"],
                                 learning_rate=args.prune_lr or lr)
            quantize = colopt.Quantize(epochs=cfg["qat_epochs"], learning_rate=lr)
            acc = {}
            for per_channel in (False, True):
                ot.keras.utils.set_random_seed(seed)
                rep = colopt.explore(
                    baseline, x, y,
                    out_dir=os.path.join(work, f"lr{lr:g}_s{seed}_pc{int(per_channel)}"),
                    leaves=(["Clustered+PTQ", "CQAT"] if per_channel else
                            ["Pruned+PTQ", "PQAT", "Clustered+PTQ", "CQAT"]),
                    prune=prune, quantize=quantize,
                    cluster=colopt.Cluster(clusters=cfg["clusters"],
                                           epochs=cfg["cluster_epochs"],
                                           per_channel=per_channel, learning_rate=lr),
                    **common)
                for leaf in rep.leaves:
                    name = leaf.name + (" per channel" if per_channel else "")
                    acc[name] = leaf.int8_accuracy if leaf.ok else None
            rows.append({"lr": lr, "prune_lr": args.prune_lr or lr, "seed": seed,
                         "int8_accuracy": acc, "seconds": time.time() - t})
            print(json.dumps(rows[-1]), flush=True)
    result = {"experiment": args.experiment, "about": about["dataset"],
              "baseline_lr": cfg["lr"], "baseline_fp32_accuracy": base_acc,
              "epochs": {k: cfg[k] for k in ("baseline_epochs", "prune_epochs",
                                             "cluster_epochs", "qat_epochs")},
              "clusters": cfg["clusters"], "rows": rows, "wall_seconds": time.time() - t0,
              "command": "python benchmarks/finetune_lr.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.join(ot.HERE, "results"), exist_ok=True)
    base = os.path.join(ot.HERE, "results", f"finetune_lr_{args.experiment}{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    names = ["Pruned+PTQ", "PQAT", "Clustered+PTQ", "CQAT", "Clustered+PTQ per channel",
             "CQAT per channel"]
    lines = [f"# Fine-tuning learning rate: {args.experiment}", "",
             f"Command: `{result['command']}` ({result['wall_seconds'] / 60:.1f} min). "
             f"{about['dataset']}. Baseline: Adam {cfg['lr']:g}, {cfg['baseline_epochs']} epochs, "
             f"FP32 {100 * base_acc:.2f}%. Cluster and Quantize at the row's rate, Prune at "
             "its column's; "
             "INT8 accuracy of the .tflite in LiteRT on the test split.", "",
             "| rate | Prune's rate | seed | " + " | ".join(names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        cells = [("failed" if r["int8_accuracy"].get(n) is None
                  else f"{100 * r['int8_accuracy'][n]:.2f}%") for n in names]
        lines.append(f"| {r['lr']:g} | {r['prune_lr']:g} | {r.get('seed', 0)} | "
                     + " | ".join(cells) + " |")
    claims = [("PQAT >= Pruned+PTQ", "PQAT", "Pruned+PTQ"),
              ("CQAT >= Clustered+PTQ", "CQAT", "Clustered+PTQ"),
              ("per-channel CQAT >= per-tensor CQAT", "CQAT per channel", "CQAT")]
    if args.seeds > 1:
        lines += ["", "Over the seeds of each rate: mean ± standard deviation of the "
                  "difference (points), and in how many seeds the claim held.", "",
                  "| rate | " + " | ".join(c for c, _, _ in claims) + " |",
                  "|---:|" + "---:|" * len(claims)]
        for lr in args.lrs:
            cells = []
            for _, a, b in claims:
                d = [100 * (r["int8_accuracy"][a] - r["int8_accuracy"][b]) for r in rows
                     if r["lr"] == lr and r["int8_accuracy"].get(a) is not None
                     and r["int8_accuracy"].get(b) is not None]
                sd = statistics.stdev(d) if len(d) > 1 else 0.0
                cells.append(f"{statistics.mean(d):+.2f} ± {sd:.2f} ({sum(v >= 0 for v in d)}"
                             f"/{len(d)})" if d else "-")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
