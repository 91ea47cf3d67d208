"""What the origin claims for Ethos-U NPUs, measured with Vela (issue 26).

The origin document: "specific hardware support can use these sparse clustered models to
reduce inference latency significantly". Vela (Arm's compiler for Ethos-U) encodes weights
with a palette of at most 32 values per stream and codes runs of zeros apart: clustered and
pruned weights are stored smaller and, where the NPU waits on reading them from flash, read
faster. This runs the deployment tree on two held-out models and puts every leaf's fully
integer file (io="int8") through Vela for three NPUs, side by side in one run:

  model                                    data                                  baseline
  DS-CNN (the origin's KWS model)          synthesized keywords, 6000 train      decay
  MobileNet v1 0.25 (32x32x1)              Fashion-MNIST, 6000 train             decay

(the decay-trained baselines of finetune_heldout.py, kept in benchmarks/out/: trained with a
cosine decay to 0, compiled again at Adam(1e-3)). Tree: explore()'s defaults (Prune 50 % (2),
Cluster 8 (2), Quantize (2), the library's rate policy), target EthosU("ethos-u55-128"); every
leaf's file then also on ethos-u65-256 and ethos-u85-256 (Vela's default system configuration
and memory mode for each), and on the ethos-u55-128 in Vela's Ethos_U55_Deep_Embedded system
(200 MHz, flash at 1/16 of the clock: "-deep"). Ratios are to the PTQ leaf of the same model,
same NPU. The trees are kept in benchmarks/out/ethos_u/ (explore's state: a rerun measures
again without training them again).

Also, on the DS-CNN from the same baseline:
  palette   Cluster k (2 epochs), k in 4/8/16/32, per tensor and per channel, then PTQ:
            Vela's palette holds 32 values per weight stream;
  2:4       Prune(m_by_n=(2, 4)) (2 epochs; the layers whose input size 4 divides: all but
            the first conv) then PTQ, against unstructured 50 % (the tree's Pruned+PTQ), on
            the U85-256 (which has hardware for 2:4 sparsity) and the U55.

Goal the issue set: PCQAT encoded weights <= 0.35x PTQ's and U55-128 latency <= 0.6x PTQ's
on the DS-CNN, within the accuracy the origin's tables report (PCQAT a point or so below
the baseline).

Run: python benchmarks/ethos_u.py            (about 15 minutes on 2 cores)
     python benchmarks/ethos_u.py --smoke    (checks the script: 1 epoch, small data)
Writes benchmarks/results/ethos_u.json and ethos_u.md.
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

import keras_colopt as colopt  # noqa: E402
import finetune_heldout as fh  # noqa: E402

NPUS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256", "ethos-u55-128-deep")
# label -> EthosU arguments: Vela's default system config for each accelerator, and the U55 in
# Vela's "Deep Embedded" system too (a 200 MHz core and flash at 1/16 of its clock), where
# reading the weights from flash rather than computing sets the time.
CONFIGS = {"ethos-u55-128": {"accelerator": "ethos-u55-128"},
           "ethos-u65-256": {"accelerator": "ethos-u65-256"},
           "ethos-u85-256": {"accelerator": "ethos-u85-256"},
           "ethos-u55-128-deep": {"accelerator": "ethos-u55-128",
                                  "system_config": "Ethos_U55_Deep_Embedded"}}
MODELS = {"dscnn": "dscnn-decay", "mobilenet": "mobilenet-decay"}  # -> finetune_heldout pair


def measure(path):
    """{npu: TargetReport as a dict (without its per-operator rows)} for one file."""
    out = {}
    for npu in NPUS:
        target = colopt.targets.EthosU(**CONFIGS[npu])
        r = target.measure(path, output_dir=f"{target.output_dir_for(path)}-{npu}").as_dict()
        r.pop("layers")
        out[npu] = r
    return out


def ptq_file(model, x, folder, name):
    return colopt.export.to_tflite(model, os.path.join(folder, name + ".tflite"),
                                   quantization="int8", representative_data=x[:256],
                                   io="int8").path


def held_out(name, args):
    """`((x, y), (xt, yt), about, model, float accuracy)` of a held-out model (its decay
    baseline, trained once and kept in benchmarks/out/); small data with `--smoke`."""
    pair = MODELS[name]
    (x, y), (xt, yt), about = fh.MODELS[pair.split("-")[0]][0](args)
    if args.smoke:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
    model, _ = fh.baseline(pair, x, y, args)
    return (x, y), (xt, yt), about, model, float(model.evaluate(xt, yt, verbose=0,
                                                                batch_size=256)[1])


def tree_phases(args) -> dict:
    """explore's phases: its defaults, or one epoch each with `--smoke`."""
    if not args.smoke:
        return {}
    return dict(prune=colopt.Prune(0.5, epochs=1), cluster=colopt.Cluster(8, epochs=1),
                quantize=colopt.Quantize(epochs=1))


def tree(name, args, folder):
    (x, y), (xt, yt), about, model, float_acc = held_out(name, args)
    t0 = time.time()
    kw = tree_phases(args)
    report = colopt.explore(model, x, y, validation_data=(xt, yt), out_dir=os.path.join(
        folder, name), target=colopt.targets.EthosU("ethos-u55-128"), batch_size=64,
        latency_runs=5, **kw)
    leaves = {}
    for r in report.leaves:
        if not r.ok:
            leaves[r.name] = {"status": r.status, "reason": r.reason}
            continue
        leaves[r.name] = {"int8_accuracy": r.int8_accuracy, "gzip_bytes": r.gzip_bytes,
                          "npu": measure(r.tflite)}
    result = {"model": name, "about": about, "float_accuracy": float_acc,
              "tree_seconds": round(time.time() - t0), "leaves": leaves}
    if name == "dscnn":
        result["palette"] = palette(model, x, y, xt, yt, folder, args)
        result["two_four"] = two_four(model, x, y, xt, yt, folder, args)
    return result


def _compressed(model, x, y, phase, xt, yt, folder, name):
    fresh = keras.models.clone_model(model)
    fresh.set_weights(model.get_weights())
    fresh.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trained = colopt.collaborative_fit(fresh, x, y, phases=[phase], batch_size=64,
                                       verbose=0).model
    path = ptq_file(trained, x, folder, name)
    return {"int8_accuracy": colopt.export.evaluate_tflite(path, xt, yt), "npu": measure(path)}


def palette(model, x, y, xt, yt, folder, args):
    out = {}
    for k in (4, 8, 16, 32):
        for per_channel in (False, True):
            key = f"{k}-{'channel' if per_channel else 'tensor'}"
            out[key] = _compressed(model, x, y, colopt.Cluster(
                k, per_channel=per_channel, epochs=1 if args.smoke else 2), xt, yt, folder,
                f"palette_{key}")
            print("palette", key, out[key]["npu"]["ethos-u55-128"]["weight_bytes"], flush=True)
    return out


def two_four(model, x, y, xt, yt, folder, args):
    # Every layer whose input size 4 divides (the first conv, one input channel, stays dense).
    fits = [l.name for l in model.layers
            if getattr(l, "kernel", None) is not None and int(l.kernel.shape[-2]) % 4 == 0]
    result = _compressed(model, x, y, colopt.Prune(m_by_n=(2, 4), layers=fits,
                                                   epochs=1 if args.smoke else 2),
                         xt, yt, folder, "pruned_2of4")
    result["layers"] = fits
    return result


def _ratio(v, ref):
    return "-" if not ref or v is None else f"{v / ref:.2f}x"


def table(results) -> str:
    out = ["# Ethos-U: the deployment tree through Vela (issue 26)", "",
           f"Vela {results['vela']}, each NPU at Vela's default system configuration and "
           "memory mode; every leaf exported fully integer (int8 in and out, batch 1); "
           "latency = Vela's estimated inference time. Ratios to the PTQ leaf of the same model "
           f"on the same NPU. {results['machine']}.", ""]
    for m in results["models"]:
        out += [f"## {m['model']}: {m['about']}", "",
                f"Float baseline (Keras) {100 * m['float_accuracy']:.2f} %; tree built in "
                f"{m['tree_seconds']} s.", ""]
        ptq = m["leaves"].get("PTQ", {}).get("npu", {})
        head = "| leaf | int8 acc | gzip B |"
        sep = "|---|---:|---:|"
        for npu in NPUS:
            head += f" {npu} weights B | x PTQ | {npu} us | x PTQ |"
            sep += "---:|---:|---:|---:|"
        out += [head + " U55 SRAM / flash B | U55 CPU ops |", sep + "---:|---|"]
        for leaf, r in m["leaves"].items():
            if "npu" not in r:
                out.append(f"| {leaf} | {r['status']}: {r['reason']} |")
                continue
            row = f"| {leaf} | {100 * r['int8_accuracy']:.2f} | {r['gzip_bytes']:,} |"
            for npu in NPUS:
                v, ref = r["npu"][npu], ptq.get(npu, {})
                row += (f" {v['weight_bytes']:,} | {_ratio(v['weight_bytes'], ref.get('weight_bytes'))}"
                        f" | {1e3 * v['latency_ms']:.1f} | "
                        f"{_ratio(v['latency_ms'], ref.get('latency_ms'))} |")
            u55 = r["npu"]["ethos-u55-128"]
            cpu = ", ".join(f"{n} {op}" for op, n in u55["cpu_ops"].items()) or "none"
            out.append(row + f" {u55['sram_bytes']:,} / {u55['flash_bytes']:,} | {cpu} |")
        if "palette" in m:
            out += ["", "Palette: Cluster k (per tensor / per channel), then PTQ, from the same "
                    "baseline:", "", "| clusters | int8 acc | U55 weights B | x PTQ | U55 us "
                    "| x PTQ | U85 weights B | U85 us |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for key, r in m["palette"].items():
                a, b = r["npu"]["ethos-u55-128"], r["npu"]["ethos-u85-256"]
                out.append(f"| {key} | {100 * r['int8_accuracy']:.2f} | {a['weight_bytes']:,} | "
                           f"{_ratio(a['weight_bytes'], ptq['ethos-u55-128']['weight_bytes'])} | "
                           f"{1e3 * a['latency_ms']:.1f} | "
                           f"{_ratio(a['latency_ms'], ptq['ethos-u55-128']['latency_ms'])} | "
                           f"{b['weight_bytes']:,} | {1e3 * b['latency_ms']:.1f} |")
        if "two_four" in m:
            pruned = m["leaves"].get("Pruned+PTQ", {}).get("npu")
            out += ["", "2:4 against unstructured 50 % (both then PTQ):", "",
                    "| pruning | int8 acc | U85 weights B | U85 us | U55 weights B | U55 us |",
                    "|---|---:|---:|---:|---:|---:|"]
            rows = [("2:4", m["two_four"])]
            if pruned:
                rows.insert(0, ("50 % unstructured (Pruned+PTQ)",
                                {"int8_accuracy": m["leaves"]["Pruned+PTQ"]["int8_accuracy"],
                                 "npu": pruned}))
            for label, r in rows:
                a, b = r["npu"]["ethos-u55-128"], r["npu"]["ethos-u85-256"]
                out.append(f"| {label} | {100 * r['int8_accuracy']:.2f} | {b['weight_bytes']:,} | "
                           f"{1e3 * b['latency_ms']:.1f} | {a['weight_bytes']:,} | "
                           f"{1e3 * a['latency_ms']:.1f} |")
        out.append("")
    return "\n".join(out)


def arguments() -> argparse.ArgumentParser:
    """The models, their data, --smoke and --results (this script's and search.py's)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--kws", default=os.path.join(HERE, "out", "kws", "kws_features.npz"))
    ap.add_argument("--kws-train", type=int, default=6000)
    ap.add_argument("--fashion-train", type=int, default=6000)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    return ap


def main():
    args = arguments().parse_args()
    from importlib.metadata import version

    results = {"vela": version("ethos-u-vela"), "models": [],
               "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    # The trees' nodes and leaves are kept here: the same run again reuses them (explore's
    # state) and only measures again.
    folder = os.path.join(HERE, "out", "ethos_u_smoke" if args.smoke else "ethos_u")
    os.makedirs(folder, exist_ok=True)
    for name in args.models:
        results["models"].append(tree(name, args, folder))
        print(table(results), flush=True)
    stem = "ethos_u_smoke" if args.smoke else "ethos_u"
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, stem + ".json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.results, stem + ".md"), "w") as f:
        f.write(table(results))


if __name__ == "__main__":
    main()
