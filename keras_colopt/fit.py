"""collaborative_fit: run a plan of phases as one training run.

Each phase is one `fit()` segment on a re-wrapped, re-compiled model (same
loss and metrics, a fresh optimizer from the user's optimizer config), on one
continuous epoch axis, so the user's callbacks, History and TensorBoard see
epochs 0..N-1 once each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import sys
from typing import Dict, List, Optional

import tensorflow as tf
import tf_keras

from keras_colopt import callbacks as cbs
from keras_colopt import stats
from keras_colopt.engines import get_engine
from keras_colopt.plan import Plan, PlannedPhase, resolve

log = logging.getLogger("keras_colopt")

_MANAGED = {
    "epochs": "the epochs come from the phases: give each phase its `epochs`",
    "initial_epoch": "the epoch axis is managed across phases",
    "x": "pass x positionally", "y": "pass y positionally",
}


@dataclasses.dataclass
class FitResult:
    """What `collaborative_fit` returns.

    Attributes:
        model: the optimized model, still wrapped for its last phase (a QAT
            model after Quantize); pass it to `export.to_tflite`.
        history: a `tf_keras.callbacks.History` over all epochs; its
            `history["phase"]` gives each epoch's phase label.
        plan: the resolved `Plan` (epoch ranges, preservation).
        stopped_early: label of the phase a callback stopped, or None.
        folded: {layer: activation layer folded into it} (see DESIGN.md's
            tfmot facts: a standalone ReLU defeats preserving QAT).
        skipped: {phase label: [layers it could not touch]}.
    """

    model: tf_keras.Model
    history: tf_keras.callbacks.History
    plan: Plan
    stopped_early: Optional[str] = None
    folded: Dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: Dict[str, List[str]] = dataclasses.field(default_factory=dict)


def steps_per_epoch_of(x, batch_size=None, steps_per_epoch=None, validation_split=0.0) -> int:
    """Number of training steps per epoch `fit` will run for these inputs.

    Raises ValueError when it cannot be known (an infinite or unsized dataset
    without `steps_per_epoch`) or when there is nothing to train on.
    """
    if steps_per_epoch is not None:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) \
                or steps_per_epoch < 1:
            raise ValueError("`steps_per_epoch` must be a positive integer. "
                             f"Received: steps_per_epoch={steps_per_epoch!r}")
        return steps_per_epoch
    if isinstance(x, tf.data.Dataset):
        card = int(x.cardinality().numpy())
        if card == 0:
            raise ValueError("The training dataset is empty (cardinality 0). Expected at "
                             "least one batch. Check the dataset's source and filters.")
        if card < 0:
            kind = "infinite" if card == tf.data.INFINITE_CARDINALITY else "of unknown size"
            raise ValueError(
                f"The training dataset is {kind}, so the pruning schedule cannot be laid out "
                "over the phase's epochs. Expected `steps_per_epoch`. Pass "
                "steps_per_epoch=N (batches per epoch), or use "
                "dataset.apply(tf.data.experimental.assert_cardinality(N)).")
        return card
    if isinstance(x, tf_keras.utils.Sequence):
        return len(x)
    first = x
    if isinstance(x, dict):
        first = next(iter(x.values()), None)
    elif isinstance(x, (list, tuple)):
        first = x[0] if x else None
    if first is None or not hasattr(first, "__len__"):
        raise ValueError("Cannot tell how many steps an epoch has for this `x` "
                         f"(type {type(x).__name__}). Pass steps_per_epoch=N.")
    n = len(first)
    n_train = int(math.floor(n * (1.0 - (validation_split or 0.0))))
    if n_train < 1:
        raise ValueError(f"No training samples: x has {n} sample(s) and validation_split="
                         f"{validation_split}. Expected at least one training sample.")
    return int(math.ceil(n_train / float(batch_size or 32)))


def _check_inputs(callbacks, fit_kwargs, log_dir):
    for key in fit_kwargs:
        if key in _MANAGED:
            raise ValueError(f"collaborative_fit manages `{key}`: {_MANAGED[key]}. "
                             f"Remove it from the call. Received: {key}={fit_kwargs[key]!r}")
    allowed = set(inspect.signature(tf_keras.Model.fit).parameters) - {"self"}
    unknown = sorted(set(fit_kwargs) - allowed)
    if unknown:
        raise TypeError(f"collaborative_fit got unknown keyword argument(s) {unknown}. "
                        f"Expected keyword arguments of Model.fit: {sorted(allowed - set(_MANAGED))}.")
    if callbacks is None:
        callbacks = []
    if isinstance(callbacks, tf_keras.callbacks.Callback):
        raise ValueError("`callbacks` must be a list of callbacks, not a single one. Wrap it: "
                         f"callbacks=[{type(callbacks).__name__}(...)]")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, tf_keras.callbacks.Callback):
            raise TypeError(
                f"callbacks[{i}] is a {type(cb).__module__}.{type(cb).__name__}, not a tf_keras "
                "callback. Expected instances of tf_keras.callbacks.Callback (a Keras 3 "
                "`keras.callbacks` object cannot drive a tf_keras model). Use the "
                "same callback from `tf_keras.callbacks`.")
    if log_dir is not None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"`log_dir` must be a path. Received: log_dir={log_dir!r}")
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise ValueError(f"`log_dir` {os.fspath(log_dir)!r} exists and is not a directory. "
                             "Expected a directory (it is created if missing). Pick another path.")
    return callbacks


def _phase_expectations(planned: PlannedPhase, touched: List[str],
                        pruned: List[str], clustered: List[str]):
    """Per-layer expectations of one phase, from the plan (not from the wrappers,
    which miss exactly the layers tfmot skips silently)."""
    sp, cl = {}, {}
    kind = planned.phase.kind
    if kind == "prune":
        sp = {n: planned.sparsity for n in touched}
    elif kind == "cluster":
        cl = {n: planned.clusters for n in touched}
        if planned.preserve_sparsity and planned.sparsity is not None:
            sp = {n: planned.sparsity for n in touched if n in pruned}
    elif kind == "quantize":
        if planned.preserve_sparsity and planned.sparsity is not None:
            sp = {n: planned.sparsity for n in touched if n in pruned}
        if planned.preserve_clusters and planned.clusters is not None:
            cl = {n: planned.clusters for n in touched if n in clustered}
    return sp, cl


@contextlib.contextmanager
def _visible_log(verbose):
    """Shows this library's INFO lines (plan, phase transitions) on stdout while `fit` prints
    its progress, unless the application configured logging itself."""
    if verbose == 0 or log.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[keras_colopt] %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _transition_line(label, before, after) -> str:
    b, a = stats.summarize(before.values()), stats.summarize(after.values())
    return (f"{label}: zeros {b['zeros']}/{b['size']} ({100 * b['sparsity']:.2f}%) -> "
            f"{a['zeros']}/{a['size']} ({100 * a['sparsity']:.2f}%), max unique weights per "
            f"layer {b['max_unique']} -> {a['max_unique']} (per output channel "
            f"{b['max_unique_per_channel']} -> {a['max_unique_per_channel']})")


def collaborative_fit(model, x=None, y=None, *, phases, validation_data=None, batch_size=None,
                      callbacks=None, log_dir=None, compression_metrics=True,
                      invariant_guard=True, guard_tolerance=0.005, verbose="auto",
                      initial_phase=0, **fit_kwargs) -> FitResult:
    """Trains `model` through a list of phases in one run.

    Everything is checked before any training: the phase order, the model
    (a compiled tf_keras Sequential/Functional model), `layers=` selections,
    the fit arguments. The user's model is never modified: the phases run on a
    copy, returned as `result.model`.

    Args:
        model: a compiled tf_keras model.
        x, y: training data as for `Model.fit`; `x` may be a `tf.data.Dataset`.
        phases: list of `Train`, `Prune`, `Cluster`, `Quantize`.
        validation_data: as for `Model.fit`.
        batch_size: as for `Model.fit`.
        callbacks: the user's callbacks; they see every phase (one `fit()` each,
            so `on_train_begin` runs once per phase) on one epoch axis.
        log_dir: TensorBoard directory: Keras' own scalars (loss, metrics) and
            the per-layer compression scalars under `compression/`.
        compression_metrics: install `CompressionMetrics`. Defaults to `True`.
        invariant_guard: `True` installs an `InvariantGuard` per phase with the
            plan's expectations, `"warn"` only warns, `False` installs none.
        guard_tolerance: the guard's sparsity tolerance. Defaults to `0.005`.
        verbose: as for `Model.fit`.
        initial_phase: index of the first phase to run, as `initial_epoch` is
            for `Model.fit`: `phases[:initial_phase]` were already applied to
            `model` (e.g. it is the stripped result of an earlier call with
            those phases); they are planned, so later phases preserve their
            work and the epoch axis continues after them, but not run.
            Defaults to `0`.
        **fit_kwargs: other `Model.fit` arguments (class_weight,
            steps_per_epoch, validation_split, shuffle, ...).

    Returns:
        A `FitResult` (model, history, plan, ...).

    Example:
        >>> result = collaborative_fit(model, x, y, phases=[Train(epochs=5),
        ...     Prune(sparsity=0.5, epochs=3), Cluster(clusters=8, epochs=3),
        ...     Quantize(epochs=2)], validation_data=(xv, yv), log_dir="logs/run1")
    """
    with _visible_log(verbose):
        return _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks,
                                  log_dir, compression_metrics, invariant_guard,
                                  guard_tolerance, verbose, initial_phase, fit_kwargs)


def _check_initial_phase(initial_phase, plan: Plan) -> int:
    if (isinstance(initial_phase, bool) or not isinstance(initial_phase, int)
            or not 0 <= initial_phase < len(plan)):
        raise ValueError(
            "`initial_phase` must be the index of a phase to start from. Expected an int in "
            f"[0, {len(plan) - 1}] for these {len(plan)} phases. Received: "
            f"initial_phase={initial_phase!r}")
    return initial_phase


def _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks, log_dir,
                       compression_metrics, invariant_guard, guard_tolerance, verbose,
                       initial_phase, fit_kwargs) -> FitResult:
    plan = resolve(phases)
    start = _check_initial_phase(initial_phase, plan)
    engine = get_engine(model)
    user_callbacks = _check_inputs(callbacks, fit_kwargs, log_dir)
    if invariant_guard not in (True, False, "warn"):
        raise ValueError("`invariant_guard` must be True, False or 'warn'. "
                         f"Received: invariant_guard={invariant_guard!r}")
    if not isinstance(compression_metrics, bool):
        raise ValueError("`compression_metrics` must be a bool. "
                         f"Received: compression_metrics={compression_metrics!r}")
    steps = steps_per_epoch_of(x, batch_size, fit_kwargs.get("steps_per_epoch"),
                               fit_kwargs.get("validation_split", 0.0))
    compile_cfg = engine.compile_config(model)

    work = engine.clone_model(model)
    folded = {}
    if any(p.phase.kind == "quantize" and (p.preserve_sparsity or p.preserve_clusters)
           for p in plan):
        pairs, _ = engine.fold_plan(work)
        if pairs:
            work = engine.fold_activations(work, pairs)
            folded = {w: a for w, (a, _) in pairs.items()}
            log.info("Folded standalone activation layer(s) into the layer before them, so that "
                     "preserving QAT keeps them: %s",
                     ", ".join(f"{a} -> {w}" for w, a in folded.items()))
    skipped = engine.preflight(work, plan)
    for label, names in skipped.items():
        if names:
            log.warning("%s cannot touch %d layer(s) with weights; they stay as they are: %s",
                        label, len(names), ", ".join(names))
    for p in plan:
        if p.phase.kind == "quantize" and not p.preserve_sparsity and any(
                q.phase.kind == "prune" for q in plan.phases[:p.index]):
            log.warning("%s does not preserve sparsity (preserve=%r): the pruned zeros will "
                        "not survive quantization-aware training.", p.label, p.phase.preserve)
    log.info("collaborative_fit plan (%d epochs, %d steps/epoch):\n%s%s", plan.total_epochs,
             steps, plan.describe(),
             f"\n  starting at phase {start} ({plan.phases[start].label}): the ones before "
             "were already applied to the model" if start else "")

    metrics_cb = cbs.CompressionMetrics(log_dir=log_dir) if compression_metrics else None
    tensorboard = (tf_keras.callbacks.TensorBoard(log_dir=os.fspath(log_dir))
                   if log_dir is not None else None)
    user_has_progbar = any(isinstance(c, tf_keras.callbacks.ProgbarLogger)
                           for c in user_callbacks)

    merged: Dict[str, list] = {}
    epochs_seen: List[int] = []
    labels: List[str] = []
    pruned: List[str] = []
    clustered: List[str] = []
    stopped = None
    epoch = plan.phases[start].start_epoch
    current = work
    for planned in plan.phases[:start]:  # already applied to `model`: what did they touch?
        if planned.phase.kind == "prune":
            pruned = engine.select_layers(work, planned.phase, "prune")[0]
        elif planned.phase.kind == "cluster":
            clustered = engine.select_layers(work, planned.phase, "cluster")[0]
    before = cbs.layer_stats(work, engine)
    for planned in plan.phases[start:]:
        current, companions, touched = engine.apply_phase(current, planned, steps)
        engine.compile_like(current, compile_cfg, planned.phase.learning_rate)
        if planned.phase.kind == "prune":
            pruned = list(touched)
        elif planned.phase.kind == "cluster":
            clustered = list(touched)
        phase_cbs = list(companions)
        if metrics_cb is not None:
            phase_cbs.append(metrics_cb)
        if invariant_guard:
            sp, cl = _phase_expectations(planned, touched, pruned, clustered)
            if sp or cl:
                phase_cbs.append(cbs.InvariantGuard(
                    sparsity=sp or None, clusters=cl or None,
                    mode="warn" if invariant_guard == "warn" else "raise",
                    tolerance=guard_tolerance, phase=planned.label,
                    per_channel=planned.per_channel))
        if verbose != 0 and not user_has_progbar:
            phase_cbs.append(tf_keras.callbacks.ProgbarLogger(count_mode="steps"))
        phase_cbs += user_callbacks
        if tensorboard is not None:
            phase_cbs.append(tensorboard)
        end = epoch + planned.epochs
        log.info("Phase %d/%d: %s, epochs %d-%d", planned.index + 1, len(plan), planned.label,
                 epoch, end - 1)
        with engine.quiet_expected_warnings(current):
            h = current.fit(x, y, batch_size=batch_size, epochs=end, initial_epoch=epoch,
                            validation_data=validation_data, callbacks=phase_cbs,
                            verbose=verbose, **fit_kwargs)
        ran = list(h.epoch)
        for key in set(merged) | set(h.history):
            merged.setdefault(key, [float("nan")] * len(epochs_seen))
            merged[key] += list(h.history.get(key, [float("nan")] * len(ran)))
        epochs_seen += ran
        labels += [planned.label] * len(ran)
        after = cbs.layer_stats(current, engine)
        log.info("%s", _transition_line(planned.label, before, after))
        before = after
        epoch = epoch + len(ran)
        if current.stop_training and len(ran) < planned.epochs:
            stopped = planned.label
            log.warning("A callback stopped training during %s at epoch %d; the remaining "
                        "phases were not run.", planned.label, epoch - 1)
            break

    history = tf_keras.callbacks.History()
    history.set_model(current)
    history.epoch = epochs_seen
    history.history = dict(merged)
    history.history["phase"] = labels
    return FitResult(model=current, history=history, plan=plan, stopped_early=stopped,
                     folded=folded, skipped=skipped)
