"""`keras-colopt` command line (also `python -m keras_colopt`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from keras_colopt.runs import (RunInputError, format_layer_table, format_run_summary,
                               layer_summary, load_model, new_log_dir, run_recipe,
                               write_summary)


def _setup_logging(verbose: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="[keras_colopt] %(message)s")
    logging.getLogger("keras_colopt").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # "Assets written to ..." per export


def dashboard_line(logs: str) -> str:
    """The one command that opens the dashboard on `logs` (a folder of runs), and where.

    Example:
        >>> dashboard_line("colopt-demo/logs")
        'Dashboard: tensorboard --logdir colopt-demo/logs  (then open http://localhost:6006/#keras_colopt)'
    """
    import shlex

    rel = os.path.relpath(logs)
    shown = logs if rel.startswith("..") else rel
    return (f"Dashboard: tensorboard --logdir {shlex.quote(shown)}  "
            "(then open http://localhost:6006/#keras_colopt)")


def run_demo(out: str, train_epochs: int = 15, prune_epochs: int = 4, cluster_epochs: int = 3,
             quantize_epochs: int = 3, verbose: int = 1, seed: int = 0) -> dict:
    """The main job on the embedded digits dataset: a short baseline, then
    Prune 50% -> Cluster 8 (sparsity-preserving) -> PCQAT, int8 export, and a
    per-layer summary of what survived. Writes everything under `out`.

    Returns:
        The summary as a dict (also written to `out/summary.json`).
    """
    import keras_colopt as colopt
    from keras_colopt import data
    from keras_colopt.engines import get_engine
    from keras_colopt.engines.base import Callback

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    log_dir = new_log_dir(out)
    (x, y), (xt, yt) = data.load_digits(seed=seed)
    model = data.demo_model(seed=seed)

    class _KeepBaseline(Callback):
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

    # Both files' per-layer tables also go to the dashboard (the run's "Deployed model").
    base_info = colopt.export.to_tflite(keep.baseline, os.path.join(out, "baseline_int8.tflite"),
                                        quantization="int8", representative_data=x[:256],
                                        log_dir=log_dir)
    opt_info = colopt.export.to_tflite(result.model, os.path.join(out, "pcqat_int8.tflite"),
                                       quantization="int8", log_dir=log_dir)
    # The same two models as a microcontroller or an NPU takes them (int8 in and out, batch
    # 1), on the Ethos-U55 (128 MACs) the origin's authors build for, as Vela estimates it.
    npu = colopt.targets.EthosU("ethos-u55-128")
    on_npu = {}
    for name, m, rep in (("baseline", keep.baseline, x[:256]), ("pcqat", result.model, None)):
        on_npu[name] = colopt.export.to_tflite(
            m, os.path.join(out, f"{name}_int8_io.tflite"), quantization="int8",
            representative_data=rep, io="int8", target=npu, log_dir=log_dir).on_target
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
        "ethos_u55_128": {name: {"latency_ms": r.latency_ms, "weight_bytes": r.weight_bytes,
                                 "cpu_ops": r.cpu_ops, "compiled": r.compiled}
                          for name, r in on_npu.items()},
        "layers": layer_summary(result.model, opt_info.path),
        "files": {"log_dir": log_dir, "baseline": base_info.path, "pcqat": opt_info.path,
                  "baseline_int8_io": on_npu["baseline"].file,
                  "pcqat_int8_io": on_npu["pcqat"].file},
        "train_seconds": train_time,
        "wall_seconds": time.time() - t0,
    }
    write_summary(out, summary, format_summary(summary))
    return summary


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
        *_npu_rows(s.get("ethos_u55_128")),
        "",
        *rows,
        "",
        f"wall time {s['wall_seconds']:.1f} s (training {s['train_seconds']:.1f} s)",
    ])


def _npu_rows(npu) -> list:
    """The demo table's Ethos-U55-128 rows (the fully integer files, Vela's estimates)."""
    if not npu:
        return []
    b, p = npu["baseline"], npu["pcqat"]
    return [f"| Ethos-U55-128 weights, NPU-encoded (Vela) | {b['weight_bytes']} "
            f"| {p['weight_bytes']} ({b['weight_bytes'] / p['weight_bytes']:.2f}x smaller) |",
            f"| Ethos-U55-128 latency, Vela estimate | {1e3 * b['latency_ms']:.1f} us "
            f"| {1e3 * p['latency_ms']:.1f} us ({b['latency_ms'] / p['latency_ms']:.2f}x "
            "faster) |"]


def add_target_arguments(p) -> None:
    """`--target` (and Vela's configuration) for the commands that measure on a target."""
    p.add_argument("--target", help="where the model will run: an Ethos-U accelerator "
                                    "(ethos-u55-128, ethos-u65-256, ethos-u85-256, ...; Vela's "
                                    "estimate) or litert-cpu (LiteRT on this CPU)")
    p.add_argument("--system-config", help="Vela system configuration (default: Vela's for "
                                           "the accelerator)")
    p.add_argument("--memory-mode", help="Vela memory mode (default: Vela's)")


def target_from(args):
    """The `targets` object `--target` names, or None; a ValueError for a bad one."""
    from keras_colopt import targets

    if args.target is None:
        if args.system_config or args.memory_mode:
            raise ValueError("--system-config and --memory-mode configure an Ethos-U "
                             "--target. Expected --target ethos-u55-128 (or another).")
        return None
    return targets.get(args.target, system_config=args.system_config,
                       memory_mode=args.memory_mode)


def run_report(out: str, model_path=None, data_path=None, leaves=None, baseline_epochs=None,
               prune_epochs: int = 3, cluster_epochs: int = 2, qat_epochs: int = 2,
               sparsity: float = 0.5, clusters: int = 8, per_channel: bool = False,
               max_accuracy_drop=None, max_size_bytes=None, max_latency_ms=None,
               batch_size: int = 32, verbose: int = 1, seed: int = 0, target=None):
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
        verbose=2 if verbose > 1 else 0, target=target)


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
    p.add_argument("--max-size-bytes", type=int, help="target: gzipped .tflite size (with "
                                                      "--target: the weights as it stores them)")
    p.add_argument("--max-latency-ms", type=float, help="target: median ms per inference "
                                                        "(with --target: its latency)")
    add_target_arguments(p)
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
        batch_size=args.batch_size, verbose=0 if args.quiet else 1, seed=args.seed,
        target=target_from(args))
    print()
    print(report.to_markdown())
    print(f"Files: {out} (report.md, report.csv, report.json, density.png, pareto.png, "
          "tflite/*.tflite)")
    print(dashboard_line(os.path.join(out, "logs")))
    failed = [r.name for r in report.leaves if r.status == "failed"]
    return 1 if failed and len(failed) == len(report.leaves) else 0


RUN_DATA_HELP = """\
The data file is a .npz written with
  np.savez("data.npz", x_train=x, y_train=y, x_val=xv, y_val=yv)
x_train and y_train are required; x_val and y_val are optional and come together (with
them, the .tflite is evaluated in LiteRT). No other arrays, no object arrays. For the
accuracy, labels are integer classes (or one-hot rows).
The model file is a compiled tf_keras model saved with model.save("model.keras") (or .h5).
Neither file, nor the recipe, is modified; everything is written under --out."""


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="a recipe of phases (YAML/JSON) on your model and data, then export",
        description="Runs the phases of RECIPE on a copy of the model, exports the result as "
                    ".tflite with the recipe's quantization, and summarizes what survived.",
        epilog=RUN_DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE",
                   help="a .yaml/.yml/.json recipe: phases, optional fit and export sections")
    p.add_argument("--model", required=True, help="a compiled tf_keras model (.keras or .h5)")
    p.add_argument("--data", required=True,
                   help=".npz with x_train, y_train and optionally x_val, y_val")
    p.add_argument("--out", default="colopt-run", help="output directory (default: ./colopt-run)")
    p.add_argument("--quiet", action="store_true", help="one line per phase, not per epoch")
    p.add_argument("--checkpoint-dir",
                   help="checkpoint every epoch here (default: OUT/checkpoint); rerunning the "
                        "same command after a crash continues from the last completed epoch")
    p.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint")
    add_target_arguments(p)


def _run_command(args) -> int:
    from keras_colopt.checkpoint import CheckpointMismatch
    from keras_colopt.recipe import RecipeError

    out = os.path.abspath(args.out)
    print(f"keras-colopt run: {args.recipe} on {args.model} with {args.data}; writing to {out}",
          flush=True)
    try:
        target = target_from(args)
    except ValueError as e:
        print(f"keras-colopt run: error: {e}", file=sys.stderr)
        return 2
    try:
        s = run_recipe(args.recipe, args.model, args.data, out, verbose=0 if args.quiet else 1,
                       checkpoint_dir=False if args.no_checkpoint else args.checkpoint_dir,
                       target=target)
    except (RecipeError, RunInputError, CheckpointMismatch) as e:
        print(f"keras-colopt run: error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_run_summary(s))
    print()
    names = ", ".join(os.path.basename(s["files"][k])
                      for k in ("summary_md", "summary_json", "tflite", "recipe"))
    print(f"Files: {out} ({names})")
    print(dashboard_line(os.path.dirname(s["files"]["log_dir"])))
    return 0


def _search_parser(sub) -> None:
    p = sub.add_parser(
        "search", help="search the compression settings (a search recipe) for the Pareto "
                       "front of accuracy, size and latency, and the smallest model meeting "
                       "the recipe's targets",
        description="Runs colopt.search with the settings of RECIPE (a `search:` mapping: "
                    "budget, targets, target, space, storage) on a trained model. Every "
                    "trial's int8 .tflite is measured as deployed; the same command again "
                    "resumes the study (OUT/search.db, or the recipe's storage: the same "
                    "command on several machines with one PostgreSQL storage runs distinct "
                    "trials of one study).",
        epilog=RUN_DATA_HELP.replace("x_val and y_val are optional and come together (with\n"
                                     "them, the .tflite is evaluated in LiteRT)",
                                     "x_val and y_val are required: every trial's .tflite is\n"
                                     "measured on them"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE", help="a .yaml/.yml/.json search recipe")
    p.add_argument("--model", required=True, help="a trained, compiled model (.keras or .h5)")
    p.add_argument("--data", required=True, help=".npz with x_train, y_train, x_val, y_val")
    p.add_argument("--out", default="colopt-search",
                   help="output directory (default: ./colopt-search)")
    p.add_argument("--storage", help="an Optuna storage URL shared by several workers "
                                     "(overrides the recipe's; default: OUT/search.db)")
    p.add_argument("--budget", type=int, help="trials in the study in all (overrides the "
                                              "recipe's)")
    add_target_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _search_command(args) -> int:
    import keras_colopt as colopt
    from keras_colopt import data, recipe, targets

    out = os.path.abspath(args.out)
    r = recipe.load_search(args.recipe)  # every setting checked before the model is loaded
    cfg = dict(r.search)
    target = target_from(args) if args.target else (
        targets.get(cfg["target"]) if cfg.get("target") else None)
    cfg.pop("target", None)
    if args.storage:
        cfg["storage"] = args.storage
    if args.budget is not None:
        cfg["budget"] = args.budget
    (x, y), val = data.load_npz(args.data, require_validation=True)
    model = load_model(args.model)
    print(f"keras-colopt search: {args.recipe} on {args.model} with {args.data}; writing to "
          f"{out}", flush=True)
    report = colopt.search(model, x, y, validation_data=val, out_dir=out, target=target,
                           **cfg, **r.fit)
    print()
    print(report.to_markdown())
    print(f"Files: {out} (search.md, search.json, tflite/*.tflite; the study: "
          f"{report.storage})")
    print(dashboard_line(os.path.join(out, "logs")))
    return 0


def _deploy_parser(sub) -> None:
    p = sub.add_parser(
        "deploy", help="what a .tflite costs on a target: Ethos-U through Vela (latency, "
                       "encoded weights, memory, CPU fallbacks, per operator) or LiteRT here",
        description="Compiles FILE for the target and prints its figures. For an Ethos-U, "
                    "Vela's outputs (FILE_vela.tflite: what goes on the device; summary, "
                    "per-layer CSV, debug database, log) are kept in --out.")
    p.add_argument("file", metavar="FILE", help="an int8 .tflite (export.to_tflite(..., "
                                                "io='int8') for a fully integer one)")
    add_target_arguments(p)
    p.set_defaults(target="ethos-u55-128")
    p.add_argument("--out", help="Vela's output folder (default: FILE_vela_<target>/ beside "
                                 "FILE)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _deploy_command(args) -> int:
    target = target_from(args)
    if args.out and not hasattr(target, "output_dir_for"):
        raise ValueError(f"--out is Vela's output folder; --target {args.target} writes none.")
    report = target.measure(args.file, output_dir=args.out) if args.out else \
        target.measure(args.file)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.to_markdown())
    return 0


def _refusing_bad_input(name: str, command, args) -> int:
    """Runs a command; a bad input (a ValueError, TargetError included; a missing file; no
    permission) is one error line and exit status 2, not a traceback."""
    try:
        return command(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"keras-colopt {name}: error: {e}", file=sys.stderr)
        return 2


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
    _run_parser(sub)
    _deploy_parser(sub)
    _search_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "deploy":
        return _refusing_bad_input("deploy", _deploy_command, args)
    _setup_logging(0 if args.quiet else 1)
    if args.command == "run":
        return _run_command(args)
    if args.command == "search":
        from keras_colopt.checkpoint import CheckpointMismatch

        try:
            return _search_command(args)
        except (ValueError, FileNotFoundError, PermissionError, CheckpointMismatch) as e:
            print(f"keras-colopt search: error: {e}", file=sys.stderr)
            return 2
    if args.command == "report":
        return _refusing_bad_input("report", _report_command, args)
    if args.command == "demo":
        out = os.path.abspath(args.out)
        print(f"keras-colopt demo: writing to {out}", flush=True)
        summary = run_demo(out, verbose=0 if args.quiet else 1, seed=args.seed)
        print()
        print(format_summary(summary))
        print()
        print(f"Files: {out} (summary.md, summary.json, baseline_int8.tflite, pcqat_int8.tflite;"
              " *_int8_io.tflite: int8 in and out, for a microcontroller or an NPU; Vela's "
              "outputs in *_int8_io_vela_ethos-u55-128/)")
        print(dashboard_line(os.path.dirname(summary["files"]["log_dir"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
