"""`keras-colopt` command line (also `python -m keras_colopt`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def _setup_logging(verbose: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="[keras_colopt] %(message)s")
    logging.getLogger("keras_colopt").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # "Assets written to ..." per export


def layer_of(tensor_name: str, layer_names) -> str:
    """The Keras layer a `.tflite` tensor name belongs to ('' when none matches)."""
    parts = [p for chunk in tensor_name.split(";") for p in chunk.split("/")]
    for name in sorted(layer_names, key=len, reverse=True):
        if name in parts or f"quant_{name}" in parts:
            return name
    return ""


def run_demo(out: str, train_epochs: int = 15, prune_epochs: int = 4, cluster_epochs: int = 3,
             quantize_epochs: int = 3, verbose: int = 1, seed: int = 0) -> dict:
    """The main job on the embedded digits dataset: a short baseline, then
    Prune 50% -> Cluster 8 (sparsity-preserving) -> PCQAT, int8 export, and a
    per-layer summary of what survived. Writes everything under `out`.

    Returns:
        The summary as a dict (also written to `out/summary.json`).
    """
    import tf_keras

    import keras_colopt as colopt
    from keras_colopt import callbacks as cbs
    from keras_colopt import data
    from keras_colopt.engines import get_engine

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    # One TensorBoard run per demo run: a second run into the same DIR must not mix its
    # epochs with the first one's on the same axis.
    log_dir = os.path.join(out, "logs", time.strftime("run-%Y%m%d-%H%M%S"))
    (x, y), (xt, yt) = data.load_digits(seed=seed)
    model = data.demo_model(seed=seed)

    class _KeepBaseline(tf_keras.callbacks.Callback):
        """Keeps a copy of the model at the end of the first (Train) phase."""
        baseline = None

        def on_train_end(self, logs=None):
            if self.baseline is None:
                engine = get_engine(self.model)
                self.baseline = engine.clone_model(self.model)
                engine.compile_like(self.baseline, engine.compile_config(self.model))

    keep = _KeepBaseline()
    result = colopt.collaborative_fit(
        model, x, y, phases=[colopt.Train(epochs=train_epochs),
                             colopt.Prune(sparsity=0.5, epochs=prune_epochs),
                             colopt.Cluster(clusters=8, epochs=cluster_epochs),
                             colopt.Quantize(epochs=quantize_epochs)],
        validation_data=(xt, yt), batch_size=32, callbacks=[keep], log_dir=log_dir,
        verbose=2 if verbose else 0)
    train_time = time.time() - t0

    base_info = colopt.export.to_tflite(keep.baseline, os.path.join(out, "baseline_int8.tflite"),
                                        quantization="int8", representative_data=x[:256])
    opt_info = colopt.export.to_tflite(result.model, os.path.join(out, "pcqat_int8.tflite"),
                                       quantization="int8")
    keras_stats = cbs.layer_stats(result.model)
    deployed = colopt.export.inspect_tflite(opt_info.path)
    layers = []
    for name, s in keras_stats.items():
        tfl = [w for w in deployed if layer_of(w.name, keras_stats) == name]
        layers.append({
            "layer": name, "weights": s.size, "keras_sparsity": s.sparsity,
            "keras_unique": s.unique, "keras_unique_per_channel": s.unique_per_channel_max,
            "tflite_sparsity": tfl[0].sparsity if tfl else None,
            "tflite_unique_per_channel": tfl[0].unique_per_channel_max if tfl else None,
            "tflite_unique": tfl[0].unique if tfl else None})
    summary = {
        "dataset": f"scikit-learn digits 8x8: {len(x)} train / {len(xt)} test",
        "phases": [p.label for p in result.plan],
        "accuracy": {
            "baseline_keras": float(keep.baseline.evaluate(xt, yt, verbose=0)[1]),
            "baseline_int8_tflite": colopt.export.evaluate_tflite(base_info.path, xt, yt),
            "pcqat_keras_fake_quant": float(result.model.evaluate(xt, yt, verbose=0)[1]),
            "pcqat_int8_tflite": colopt.export.evaluate_tflite(opt_info.path, xt, yt)},
        "size": {"baseline_int8_tflite_bytes": base_info.tflite_bytes,
                 "baseline_int8_gzip_bytes": base_info.gzip_bytes,
                 "pcqat_int8_tflite_bytes": opt_info.tflite_bytes,
                 "pcqat_int8_gzip_bytes": opt_info.gzip_bytes,
                 "gzip_reduction": 1.0 - opt_info.gzip_bytes / base_info.gzip_bytes},
        "layers": layers,
        "files": {"log_dir": log_dir, "baseline": base_info.path, "pcqat": opt_info.path},
        "train_seconds": train_time,
        "wall_seconds": time.time() - t0,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = format_summary(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    return summary


def format_summary(s: dict) -> str:
    a, z = s["accuracy"], s["size"]
    rows = ["| layer | weights | sparsity (Keras) | sparsity (.tflite) | unique (Keras) "
            "| unique per channel (Keras) | unique per channel (.tflite) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for L in s["layers"]:
        tsp = "-" if L["tflite_sparsity"] is None else f"{100 * L['tflite_sparsity']:.1f}%"
        rows.append(f"| {L['layer']} | {L['weights']} | {100 * L['keras_sparsity']:.1f}% | {tsp} "
                    f"| {L['keras_unique']} | {L['keras_unique_per_channel']} "
                    f"| {L['tflite_unique_per_channel']} |")
    return "\n".join([
        f"keras-colopt demo: {s['dataset']}; phases: {' -> '.join(s['phases'])}",
        "",
        "| | baseline | PCQAT |", "|---|---:|---:|",
        f"| Keras accuracy (PCQAT: fake int8) | {100 * a['baseline_keras']:.2f}% "
        f"| {100 * a['pcqat_keras_fake_quant']:.2f}% |",
        f"| int8 .tflite accuracy (LiteRT) | {100 * a['baseline_int8_tflite']:.2f}% "
        f"| {100 * a['pcqat_int8_tflite']:.2f}% |",
        f"| int8 .tflite bytes | {z['baseline_int8_tflite_bytes']} "
        f"| {z['pcqat_int8_tflite_bytes']} |",
        f"| gzipped bytes | {z['baseline_int8_gzip_bytes']} | {z['pcqat_int8_gzip_bytes']} "
        f"({100 * z['gzip_reduction']:.1f}% smaller) |",
        "",
        *rows,
        "",
        f"wall time {s['wall_seconds']:.1f} s (training {s['train_seconds']:.1f} s)",
    ])


def load_model(path):
    """A compiled tf_keras model from a `.keras` / `.h5` file (or SavedModel folder)."""
    import tf_keras

    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}. Expected a tf_keras model saved with "
                                "model.save('model.keras').")
    try:
        return tf_keras.models.load_model(path, compile=True)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; say what we needed
        raise ValueError(f"Cannot load {path!r} as a tf_keras model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Expected a compiled "
                         "tf_keras (Keras 2) model saved with model.save('model.keras'). A "
                         "Keras 3 model must be rebuilt with tf_keras.") from None


def run_report(out: str, model_path=None, data_path=None, leaves=None, baseline_epochs=None,
               prune_epochs: int = 3, cluster_epochs: int = 2, qat_epochs: int = 2,
               sparsity: float = 0.5, clusters: int = 8, per_channel: bool = False,
               max_accuracy_drop=None, max_size_bytes=None, max_latency_ms=None,
               batch_size: int = 32, verbose: int = 1, seed: int = 0):
    """`keras-colopt report`: the deployment tree on the embedded dataset (a fresh demo
    model, trained `baseline_epochs`, 15 by default) or on a user's trained model and data
    file (`baseline_epochs` 0 by default). Returns the `Report`."""
    import keras_colopt as colopt
    from keras_colopt import data

    if (model_path is None) != (data_path is None):
        raise ValueError("`--model` and `--data` go together: a trained model and the .npz "
                         "(x_train, y_train, x_val, y_val) to fine-tune and measure it on. Give "
                         "both, or neither for the embedded dataset.")
    if model_path is None:
        (x, y), val = data.load_digits(seed=seed)
        model = data.demo_model(seed=seed)
        baseline_epochs = 15 if baseline_epochs is None else baseline_epochs
    else:
        (x, y), val = data.load_npz(data_path, require_validation=True)
        model = load_model(model_path)
        baseline_epochs = 0 if baseline_epochs is None else baseline_epochs
    return colopt.explore(
        model, x, y, validation_data=val, out_dir=out, leaves=leaves,
        baseline_epochs=baseline_epochs,
        prune=colopt.Prune(sparsity=sparsity, epochs=prune_epochs),
        cluster=colopt.Cluster(clusters=clusters, epochs=cluster_epochs, per_channel=per_channel),
        quantize=colopt.Quantize(epochs=qat_epochs), max_accuracy_drop=max_accuracy_drop,
        max_size_bytes=max_size_bytes, max_latency_ms=max_latency_ms, batch_size=batch_size,
        verbose=2 if verbose > 1 else 0)


def _report_parser(sub):
    from keras_colopt.tree import LEAVES

    p = sub.add_parser("report", help="the deployment tree: every leaf built, measured as "
                                      "deployed, the origin's tables and plots")
    p.add_argument("--out", default="colopt-report",
                   help="output directory (default: ./colopt-report)")
    p.add_argument("--model", help="a trained, compiled tf_keras model (.keras/.h5); "
                                   "default: the demo CNN trained on the embedded digits")
    p.add_argument("--data", help=".npz with x_train, y_train, x_val, y_val (with --model)")
    p.add_argument("--leaves", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                   help=f"comma-separated subset of: {','.join(LEAVES)} (default: all)")
    p.add_argument("--baseline-epochs", type=int,
                   help="train the baseline first (default: 15 on the embedded dataset, "
                        "0 with --model)")
    p.add_argument("--prune-epochs", type=int, default=3)
    p.add_argument("--cluster-epochs", type=int, default=2)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--per-channel", action="store_true", help="cluster per output channel")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="target: int8 accuracy at most this far below the FP32 baseline "
                        "(fraction: 0.01 = 1 point)")
    p.add_argument("--max-size-bytes", type=int, help="target: gzipped .tflite size")
    p.add_argument("--max-latency-ms", type=float, help="target: median ms per inference")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--seed", type=int, default=0)


def _report_command(args) -> int:
    out = os.path.abspath(args.out)
    print(f"keras-colopt report: writing to {out}", flush=True)
    report = run_report(
        out, args.model, args.data, leaves=args.leaves, baseline_epochs=args.baseline_epochs,
        prune_epochs=args.prune_epochs, cluster_epochs=args.cluster_epochs,
        qat_epochs=args.qat_epochs, sparsity=args.sparsity, clusters=args.clusters,
        per_channel=args.per_channel, max_accuracy_drop=args.max_accuracy_drop,
        max_size_bytes=args.max_size_bytes, max_latency_ms=args.max_latency_ms,
        batch_size=args.batch_size, verbose=0 if args.quiet else 1, seed=args.seed)
    print()
    print(report.to_markdown())
    print(f"Files: {out} (report.md, report.csv, report.json, density.png, pareto.png, "
          "tflite/*.tflite)")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(out, 'logs')}")
    failed = [r.name for r in report.leaves if r.status == "failed"]
    return 1 if failed and len(failed) == len(report.leaves) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="keras-colopt",
        description="Collaborative optimization (prune, cluster, quantize) for Keras models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the embedded digits dataset: baseline, "
                                       "Prune 50%% -> Cluster 8 -> PCQAT, int8 .tflite, summary")
    demo.add_argument("--out", default="colopt-demo",
                      help="output directory (default: ./colopt-demo)")
    demo.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    demo.add_argument("--seed", type=int, default=0)
    _report_parser(sub)
    args = parser.parse_args(argv)
    _setup_logging(0 if args.quiet else 1)
    if args.command == "report":
        try:
            return _report_command(args)
        except (ValueError, FileNotFoundError, PermissionError) as e:
            print(f"keras-colopt report: error: {e}", file=sys.stderr)
            return 2
    if args.command == "demo":
        out = os.path.abspath(args.out)
        print(f"keras-colopt demo: writing to {out}", flush=True)
        summary = run_demo(out, verbose=0 if args.quiet else 1, seed=args.seed)
        print()
        print(format_summary(summary))
        print()
        print(f"Files: {out} (summary.md, summary.json, baseline_int8.tflite, pcqat_int8.tflite)")
        print(f"TensorBoard: tensorboard --logdir {os.path.dirname(summary['files']['log_dir'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
