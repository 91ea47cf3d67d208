"""The runs the command line starts, as library functions.

`run_recipe` (`keras-colopt run`): a recipe of phases on the user's model and data files,
checked before any training, then exported and summarized; and the output-folder helpers
the demo and the report share with it (a fresh TensorBoard run folder, the summary files,
the per-layer table of the model and its `.tflite`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np


def layer_summary(model, tflite_path) -> list:
    """Per layer: weights, sparsity and unique values in the Keras model and as deployed in
    the `.tflite` (read back with `export.inspect_tflite`); `None` where the `.tflite` has no
    weight tensor of that layer."""
    from keras_colopt import export
    from keras_colopt.kernels import effective_kernels, layer_stats

    kernels = effective_kernels(model)
    keras_stats = layer_stats(model, kernels=kernels)
    deployed = export.inspect_tflite(tflite_path)
    of = export.layers_of(tflite_path, kernels)
    layers = []
    for name, s in keras_stats.items():
        tfl = [w for w, layer in zip(deployed, of) if layer == name]
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


def load_model(path):
    """A compiled model from a `.keras` / `.h5` file (or SavedModel folder), loaded by the
    engine of its Keras flavour (a Keras 3 `.keras` file by the Keras 3 engine)."""
    from keras_colopt.engines import load_model as by_flavour

    return by_flavour(path)


class RunInputError(ValueError):
    """A `keras-colopt run` input (recipe, model, data, output folder) that cannot be used;
    raised before any training."""


def _check_model_and_data(model, model_path, inputs: dict, data_path) -> None:
    """Refuses an uncompiled or multi-input model, and inputs (`{"x_train": x, ...}`) whose
    sample shape or dtype the model cannot take."""
    from keras_colopt.engines import get_engine

    try:
        get_engine(model)
    except (ValueError, TypeError) as e:
        raise RunInputError(f"{model_path!r}: {e} Then save it again with "
                            "model.save(path).") from None
    shape = model.input_shape
    if isinstance(shape, list):
        raise RunInputError(
            f"{model_path!r} has {len(shape)} inputs; `run` feeds one array (x_train). "
            "Expected a model with one input. Use collaborative_fit from Python for "
            f"multi-input models. Received: input_shape={shape}")
    for name, x in inputs.items():
        if x.ndim != len(shape) or any(m is not None and m != d
                                       for m, d in zip(shape[1:], x.shape[1:])):
            raise RunInputError(
                f"{data_path!r}: {name} has samples of shape {x.shape[1:]}, but the model in "
                f"{model_path!r} takes {tuple(shape[1:])}. Expected {name} of shape "
                f"(n, {', '.join('?' if d is None else str(d) for d in shape[1:])}). Check "
                f"that the data matches the model. Received: {name}.shape={x.shape}")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise RunInputError(f"{data_path!r}: {name} has dtype {x.dtype}. Expected numbers. "
                                f"Received: {name}.dtype={x.dtype}")


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def run_recipe(recipe_path, model_path, data_path, out: str, verbose: int = 1,
               checkpoint_dir=None, target=None) -> dict:
    """`keras-colopt run`: a recipe of phases on the user's model and data, then export.

    The recipe, the model and the data are loaded and checked before any training; none of
    the three files is modified. Writes under `out`: TensorBoard logs in
    `logs/run-<timestamp>`, `model_<quantization>.tflite`, `summary.json`, `summary.md` and a
    copy of the recipe.

    Args:
        recipe_path: a `.yaml`/`.yml`/`.json` recipe (see `keras_colopt.recipe`).
        model_path: a compiled tf_keras model file (`model.save("m.keras")` or `.h5`).
        data_path: a `.npz` with `x_train`, `y_train` and optionally `x_val`, `y_val`.
        out: the output folder (created).
        verbose: 0 prints one line per phase; 1 also one line per epoch.
        checkpoint_dir: where the run is checkpointed every epoch; rerunning the same
            command after a crash resumes from it. Defaults to `out/checkpoint`; `False`
            turns checkpoints off.

    Returns:
        The summary as a dict (also written to `out/summary.json`).

    Raises:
        RecipeError, RunInputError: a bad input, before any training.
    """
    import shutil

    import keras_colopt as colopt
    from keras_colopt import checkpoint, data, recipe
    from keras_colopt.engines.base import Callback

    t0 = time.time()
    r = recipe.load(recipe_path)
    try:
        (x, y), val = data.load_npz(data_path)
        model = load_model(model_path)
    except (ValueError, FileNotFoundError) as e:
        raise RunInputError(str(e)) from None
    _check_model_and_data(model, model_path,
                          {"x_train": x, **({} if val is None else {"x_val": val[0]})}, data_path)
    quant = r.quantization
    if target is not None and quant != "int8":
        raise RunInputError(f"--target {target.name} measures the int8 file, but the recipe "
                            f"exports {quant!r}. Expected export: {{quantization: int8}} in the "
                            "recipe, or no --target.")
    outputs = {"summary_json": os.path.join(out, "summary.json"),
               "summary_md": os.path.join(out, "summary.md"),
               "tflite": os.path.join(out, f"model_{quant}.tflite"),
               "recipe": os.path.join(out, "recipe" + os.path.splitext(recipe_path)[1].lower())}
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunInputError(f"--out {out!r} is a file. Expected a directory (created if "
                            "missing). Pick another path.")
    for name, written in outputs.items():
        for given in (recipe_path, model_path, data_path):
            if _same_file(written, given) and not (name == "recipe" and given == recipe_path):
                raise RunInputError(
                    f"{given!r} is where the run writes its {name.replace('_', '.')}; it would "
                    "be overwritten. Expected inputs outside the output files. Pass another "
                    f"--out, or move the file. Received: --out {out!r}")
    ckpt_dir = None if checkpoint_dir is False else os.path.abspath(
        checkpoint_dir or os.path.join(out, "checkpoint"))
    # A rerun after a crash continues the same TensorBoard run; a fresh one gets its own.
    log_dir = (checkpoint.saved_meta(ckpt_dir).get("log_dir") if ckpt_dir else None) \
        or new_log_dir(out)
    plan = r.plan

    class _PhaseProgress(Callback):
        """One line per phase as it ends (each phase is one `fit`: on_train_begin counts
        them, so this callback spans the run on purpose)."""

        def __init__(self):
            super().__init__()
            self.started = 0
            self.epoch = None

        def on_train_begin(self, logs=None):
            self.started += 1
            self.t_phase = time.time()
            self.last = {}

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            self.last = dict(logs or {})

        def on_train_end(self, logs=None):
            if self.epoch is None:
                return
            # A resumed run starts in the middle of the plan: name the phase by its epochs.
            p = next(q for q in plan.phases if q.start_epoch <= self.epoch < q.end_epoch)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in self.last.items()
                              if k in ("loss", "accuracy", "val_loss", "val_accuracy",
                                       "compression/sparsity", "compression/max_unique_weights"))
            print(f"[{p.index + 1}/{len(plan)}] {p.label}: epochs {p.start_epoch}-"
                  f"{p.end_epoch - 1} in {time.time() - self.t_phase:.1f} s; {shown}", flush=True)

    progress = _PhaseProgress()
    t_train = time.time()
    try:
        result = colopt.collaborative_fit(
            model, x, y, phases=r.phases, validation_data=val, callbacks=[progress],
            log_dir=log_dir, verbose=2 if verbose else 0, checkpoint_dir=ckpt_dir, **r.fit)
    except checkpoint.CheckpointMismatch:
        raise
    except (ValueError, TypeError) as e:
        if progress.started:
            raise
        # collaborative_fit checks the model against the phases before training.
        raise RunInputError(f"the recipe {os.fspath(recipe_path)!r} does not fit the model "
                            f"{os.fspath(model_path)!r}: {e}") from e
    train_time = time.time() - t_train

    # Nothing is written under `out` until the checks have passed and training has run.
    os.makedirs(out, exist_ok=True)
    if not _same_file(recipe_path, outputs["recipe"]):
        shutil.copyfile(recipe_path, outputs["recipe"])
    info = colopt.export.to_tflite(result.model, outputs["tflite"], quantization=quant,
                                   representative_data=x[:256] if quant == "int8" else None,
                                   log_dir=log_dir)
    on_target = None
    if target is not None:  # the file as the device takes it: int8 in and out, batch 1
        on_target = colopt.export.to_tflite(
            result.model, os.path.join(out, "model_int8_io.tflite"), quantization="int8",
            representative_data=x[:256], io="int8", target=target).on_target.as_dict()
    metrics, tflite_accuracy = {}, None
    if val is not None:
        xv, yv = val
        metrics = {k: float(v) for k, v in
                   result.model.evaluate(xv, yv, verbose=0, return_dict=True).items()}
        out_shape = result.model.output_shape
        if isinstance(out_shape, tuple) and (out_shape[-1] or 0) > 1:  # one output, classes
            labels = np.argmax(yv, axis=-1) if (yv.ndim > 1 and yv.shape[-1] > 1) else yv
            tflite_accuracy = colopt.export.evaluate_tflite(info.path, xv, labels)
    summary = {
        "recipe": os.path.abspath(recipe_path), "model": os.path.abspath(model_path),
        "data": os.path.abspath(data_path),
        "samples": {"train": len(x), "validation": 0 if val is None else len(val[0])},
        "phases": [p.label for p in result.plan],
        "stopped_early": result.stopped_early,
        "resumed_at_epoch": result.resumed_at,
        "checkpoint_dir": ckpt_dir,
        "quantization": quant,
        "accuracy": {"keras": metrics.get("accuracy"), "tflite": tflite_accuracy},
        "keras_metrics": metrics,
        "size": {"tflite_bytes": info.tflite_bytes, "gzip_bytes": info.gzip_bytes},
        "target": on_target,
        "layers": layer_summary(result.model, info.path),
        "files": {"out": out, "log_dir": log_dir, **outputs},
        "train_seconds": train_time,
        "wall_seconds": time.time() - t0,
    }
    write_summary(out, summary, format_run_summary(summary))
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


def format_run_summary(s: dict) -> str:
    """The Markdown summary of `run_recipe` (also written to `summary.md`)."""
    a, z, q = s["accuracy"], s["size"], s["quantization"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    stopped = f" (stopped early in {s['stopped_early']})" if s["stopped_early"] else ""
    if s.get("resumed_at_epoch") is not None:
        stopped += f" (resumed from its checkpoint after epoch {s['resumed_at_epoch'] - 1})"
    title = (f"keras-colopt run: {os.path.basename(s['recipe'])} on "
             f"{os.path.basename(s['model'])}, {s['samples']['train']} train / "
             f"{s['samples']['validation']} validation samples; phases: "
             f"{' -> '.join(s['phases'])}{stopped}")
    return "\n".join([
        title,
        "",
        f"| | {q} .tflite |", "|---|---:|",
        f"| Keras accuracy (validation) | {pct(a['keras'])} |",
        f"| .tflite accuracy (LiteRT, validation) | {pct(a['tflite'])} |",
        f"| .tflite bytes | {z['tflite_bytes']} |",
        f"| gzipped bytes | {z['gzip_bytes']} |",
        *([] if not s.get("target") else [
            f"| on {s['target']['target']} (int8 in/out file): latency | "
            f"{s['target']['latency_ms']:.4f} ms |",
            f"| on {s['target']['target']}: weights as stored there | "
            f"{s['target']['weight_bytes']} |",
            f"| on {s['target']['target']}: operators left to the CPU | "
            f"{', '.join(f'{n} {op}' for op, n in s['target']['cpu_ops'].items()) or 'none'} |"]),
        "",
        *format_layer_table(s["layers"]),
        "",
        f"wall time {s['wall_seconds']:.1f} s (training {s['train_seconds']:.1f} s)",
    ])
