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


def layer_of(tensor_name: str, layer_names) -> str:
    """The Keras layer a `.tflite` tensor name belongs to ('' when none matches)."""
    parts = [p for chunk in tensor_name.split(";") for p in chunk.split("/")]
    for name in sorted(layer_names, key=len, reverse=True):
        if name in parts or f"quant_{name}" in parts:
            return name
    return ""


def layer_summary(model, tflite_path) -> list:
    """Per layer: weights, sparsity and unique values in the Keras model and as deployed in
    the `.tflite` (read back with `export.inspect_tflite`); `None` where the `.tflite` has no
    weight tensor of that layer."""
    from keras_colopt import callbacks as cbs
    from keras_colopt import export

    keras_stats = cbs.layer_stats(model)
    deployed = export.inspect_tflite(tflite_path)
    layers = []
    for name, s in keras_stats.items():
        tfl = [w for w in deployed if layer_of(w.name, keras_stats) == name]
        layers.append({
            "layer": name, "weights": s.size, "keras_sparsity": s.sparsity,
            "keras_unique": s.unique, "keras_unique_per_channel": s.unique_per_channel_max,
            "tflite_sparsity": tfl[0].sparsity if tfl else None,
            "tflite_unique_per_channel": tfl[0].unique_per_channel_max if tfl else None,
            "tflite_unique": tfl[0].unique if tfl else None})
    return layers


def new_log_dir(out: str) -> str:
    """A fresh TensorBoard run folder `out/logs/run-<timestamp>`: a second run into the same
    `out` must not mix its epochs with the first one's on the same axis."""
    base = os.path.join(out, "logs", time.strftime("run-%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def write_summary(out: str, summary: dict, text: str) -> None:
    """Writes `out/summary.json` and `out/summary.md`, each atomically."""
    from keras_colopt._files import write_atomic

    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    write_atomic(os.path.join(out, "summary.md"), text + "\n")


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
    from keras_colopt import data
    from keras_colopt.engines import get_engine

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    log_dir = new_log_dir(out)
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
        "layers": layer_summary(result.model, opt_info.path),
        "files": {"log_dir": log_dir, "baseline": base_info.path, "pcqat": opt_info.path},
        "train_seconds": train_time,
        "wall_seconds": time.time() - t0,
    }
    write_summary(out, summary, format_summary(summary))
    return summary


def format_layer_table(layers) -> list:
    """The per-layer rows of a summary (see `layer_summary`) as Markdown table lines."""
    rows = ["| layer | weights | sparsity (Keras) | sparsity (.tflite) | unique (Keras) "
            "| unique per channel (Keras) | unique per channel (.tflite) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for L in layers:
        tsp = "-" if L["tflite_sparsity"] is None else f"{100 * L['tflite_sparsity']:.1f}%"
        rows.append(f"| {L['layer']} | {L['weights']} | {100 * L['keras_sparsity']:.1f}% | {tsp} "
                    f"| {L['keras_unique']} | {L['keras_unique_per_channel']} "
                    f"| {L['tflite_unique_per_channel']} |")
    return rows


def format_summary(s: dict) -> str:
    a, z = s["accuracy"], s["size"]
    rows = format_layer_table(s["layers"])
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
    args = parser.parse_args(argv)
    _setup_logging(0 if args.quiet else 1)
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
