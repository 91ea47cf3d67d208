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
from keras_colopt import checkpoint
from keras_colopt._files import make_writable_folder
from keras_colopt.checkpoint import RunCheckpoint
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
            model after Quantize); pass it to `export.to_tflite`. Nested models
            (a backbone) are flattened into it, their layers named by path.
        history: a `tf_keras.callbacks.History` over all epochs; its
            `history["phase"]` gives each epoch's phase label.
        plan: the resolved `Plan` (epoch ranges, preservation).
        stopped_early: label of the phase a callback stopped, or None.
        folded: {layer: activation layer folded into it} (see DESIGN.md's
            tfmot facts: a standalone ReLU defeats preserving QAT).
        skipped: {phase label: [layers it could not touch]}.
        resumed_at: epochs already done in `checkpoint_dir` when this call
            started (None: it started from scratch).
    """

    model: tf_keras.Model
    history: tf_keras.callbacks.History
    plan: Plan
    stopped_early: Optional[str] = None
    folded: Dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    resumed_at: Optional[int] = None


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
            raise ValueError("The training dataset is empty (cardinality 0): there is no batch "
                             "to train on. Expected at least one batch. Check the dataset's "
                             "source and filters; a dataset smaller than one batch is empty "
                             "when batched with drop_remainder=True.")
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
                      initial_phase=0, checkpoint_dir=None, strategy=None,
                      **fit_kwargs) -> FitResult:
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
        checkpoint_dir: a folder where the run is checkpointed at every epoch
            end (wrapped weights with masks, centroids and quantizer ranges,
            optimizer state, pruning step, position in the plan, history). If
            it holds a checkpoint of the same run (same phases, model
            architecture, steps per epoch), the run continues after its last
            completed epoch; a checkpoint of another run is refused
            (`CheckpointMismatch`). Defaults to `None` (no checkpoints).
        strategy: a `tf.distribute.Strategy` (e.g. `MirroredStrategy`): every
            copy, wrapping and re-compiling of the model happens in its scope,
            so each phase trains on all its devices. Defaults to `None`.
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
                                  guard_tolerance, verbose, initial_phase, checkpoint_dir,
                                  strategy, fit_kwargs)


def _check_initial_phase(initial_phase, plan: Plan) -> int:
    if (isinstance(initial_phase, bool) or not isinstance(initial_phase, int)
            or not 0 <= initial_phase < len(plan)):
        raise ValueError(
            "`initial_phase` must be the index of a phase to start from. Expected an int in "
            f"[0, {len(plan) - 1}] for these {len(plan)} phases. Received: "
            f"initial_phase={initial_phase!r}")
    return initial_phase


def _rate_text(phase, rate, compiled_rate) -> str:
    """How a phase's learning rate reads in its log line."""
    if rate is None:
        return "as compiled (a schedule)"
    if phase.learning_rate is None and phase.rate_divisor != 1:
        return f"{rate:g} (the compiled {compiled_rate:g} / {phase.rate_divisor}: fine-tuning)"
    return f"{rate:g}"


def _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks, log_dir,
                       compression_metrics, invariant_guard, guard_tolerance, verbose,
                       initial_phase, checkpoint_dir, strategy, fit_kwargs) -> FitResult:
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
    scope = _scope_of(strategy)
    chief, worker = _role(strategy)
    if not chief:
        # Another worker of a multi-worker run: the chief writes the logs the user reads;
        # this one keeps its own checkpoint (every worker saves and restores its variables).
        log_dir = None
        if checkpoint_dir is not None:
            checkpoint_dir = os.path.join(os.fspath(checkpoint_dir), worker)

    nested = engine.nested_models(model)
    with scope():
        # tfmot wraps top-level layers only: nested models are opened, in a copy (it refuses
        # a nested model called twice, which clone_model would copy into untied layers).
        work = engine.flatten_nested(model) if nested else engine.clone_model(model)
    if nested:
        log.info("Model '%s' has nested model(s) %s: flattened into one graph of %d layers, "
                 "named by path ('%s/...'), so that every phase reaches their layers.",
                 model.name, ", ".join(nested), len(work.layers), nested[0])
    folded = {}
    if any(p.phase.kind == "quantize" and (p.preserve_sparsity or p.preserve_clusters)
           for p in plan):
        pairs, _ = engine.fold_plan(work)
        if pairs:
            with scope():
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

    # Folders are created once every check has passed, right before training.
    ckpt = resume = None
    if checkpoint_dir is not None:
        ckpt = RunCheckpoint(checkpoint_dir, meta={
            "log_dir": None if log_dir is None else os.path.abspath(os.fspath(log_dir))})
        resume = ckpt.open(checkpoint.fingerprint(plan, model, steps, start))
    if log_dir is not None:
        make_writable_folder(log_dir, "`log_dir`", "TensorBoard logs (`log_dir`)")
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
    first = start
    if resume is not None:
        merged, epochs_seen, labels = resume.history, resume.epochs, resume.labels
        epoch, first = resume.epochs_done, resume.phase
    current = work
    for planned in plan.phases[:first]:  # already applied: what did they touch?
        if planned.phase.kind == "prune":
            pruned = engine.select_layers(work, planned.phase, "prune")[0]
        elif planned.phase.kind == "cluster":
            clustered = engine.select_layers(work, planned.phase, "cluster")[0]
    before = cbs.layer_stats(work, engine)
    compiled_rate = compile_cfg["optimizer_config"].get("learning_rate")
    for planned in plan.phases[first:]:
        resuming = resume is not None and planned.index == resume.phase
        rate = planned.phase.rate_for(compiled_rate)
        with scope():
            if resuming:
                work.set_weights(ckpt.load_entry(planned.index))
                current = work
            elif ckpt is not None:
                ckpt.save_entry(planned.index, engine.strip(current).get_weights())
            current, companions, touched = engine.apply_phase(current, planned, steps)
            engine.compile_like(current, compile_cfg, rate)
            if resuming:
                ckpt.restore(current, resume.state)
        if planned.phase.kind == "quantize" and planned.preserve_clusters:
            lost = engine.unpreserved_clusters(current, set(clustered) & set(touched))
            if lost:
                raise ValueError(
                    f"{planned.label}: tfmot would quantize the clustered layer(s) "
                    f"{sorted(lost)} without their clusters (it finds no usable centroids: "
                    + "; ".join(f"'{k}': {v}" for k, v in sorted(lost.items()))
                    + "); they would be lost after one step. Expected at most "
                    f"{planned.clusters} values (+ 0 when pruned) per "
                    f"{'output channel' if planned.per_channel else 'tensor'}. Exclude these "
                    "layers from the Cluster phase with layers=[...], or quantize without "
                    "cluster preservation (Quantize(preserve='sparsity' or preserve='none')).")
        if resuming:
            log.info("Resumed from %s: %d epoch(s) done, in %s; continuing at epoch %d.",
                     ckpt.folder, resume.epochs_done, planned.label, epoch)
            if log_dir is not None:
                _restart_tensorboard_runs(log_dir, epoch)
            before = cbs.layer_stats(current, engine)
        if planned.phase.kind == "prune":
            pruned = list(touched)
        elif planned.phase.kind == "cluster":
            clustered = list(touched)
        end = planned.end_epoch
        if epoch >= end:  # resumed at the end of this phase: nothing left to train in it
            continue
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
        phase_cbs.insert(0, _FiniteLoss(planned, ckpt))
        if ckpt is not None:  # last: it saves what every other callback left at epoch end
            phase_cbs.append(_EpochCheckpoint(ckpt, planned, merged, epochs_seen, labels))
        log.info("Phase %d/%d: %s, epochs %d-%d, learning rate %s", planned.index + 1, len(plan),
                 planned.label, epoch, end - 1, _rate_text(planned.phase, rate, compiled_rate))
        with engine.quiet_expected_warnings(current):
            h = current.fit(x, y, batch_size=batch_size, epochs=end, initial_epoch=epoch,
                            validation_data=validation_data, callbacks=phase_cbs,
                            verbose=verbose, **fit_kwargs)
        ran = list(h.epoch)
        merged, epochs_seen, labels = _merged(merged, epochs_seen, labels, h.history, ran,
                                              planned.label)
        after = cbs.layer_stats(current, engine)
        log.info("%s", _transition_line(planned.label, before, after))
        before = after
        epoch = epoch + len(ran)
        if current.stop_training and epoch < end:
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
                     folded=folded, skipped=skipped,
                     resumed_at=None if resume is None else resume.epochs_done)


def _merged(merged, epochs_seen, labels, new: Dict[str, list], ran: List[int], label: str):
    """The run's history so far with one `fit()`'s history appended (new copies): a key
    that appears or disappears between phases is padded with NaN."""
    out = {k: list(v) for k, v in merged.items()}
    for key in set(out) | set(new):
        out.setdefault(key, [float("nan")] * len(epochs_seen))
        out[key] += [float(v) for v in new.get(key, [float("nan")] * len(ran))]
    return out, list(epochs_seen) + list(ran), list(labels) + [label] * len(ran)


def _restart_tensorboard_runs(log_dir, epoch: int) -> None:
    """Tells TensorBoard that every run under `log_dir` restarts at `epoch`.

    A kill after an epoch's summaries were written but before its checkpoint was would show
    that epoch twice. A `SessionLog.START` event at step `epoch` makes TensorBoard drop the
    events of steps >= `epoch` read before it (its `purge_orphaned_data`, on by default).
    TensorBoard reads a run's event files in name order, and names start with the creation
    second: the marker is named to sort after every existing file, and this waits until
    the clock has passed its second, so that the files written from now on sort after it.
    """
    import tempfile
    import time

    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    newest = 0
    for root, _, files in os.walk(os.fspath(log_dir)):
        events = [f for f in files if ".tfevents." in f]
        if not events:
            continue
        stamps = [int(p) for f in events for p in f.split(".tfevents.")[1].split(".")[:1]
                  if p.isdigit()]
        second = max(stamps + [int(time.time())])
        newest = max(newest, second)
        with tempfile.TemporaryDirectory(dir=root, prefix=".colopt-") as tmp:
            writer = EventFileWriter(tmp)
            # TensorBoard takes a run's first START for its beginning, not a restart (Keras
            # writes none), so the restart is the second one.
            for _ in range(2):
                writer.add_event(event_pb2.Event(
                    step=epoch, wall_time=time.time(),
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            writer.close()
            made = os.path.join(tmp, os.listdir(tmp)[0])
            os.replace(made, os.path.join(
                root, f"events.out.tfevents.{second:010d}.~restart.{os.getpid()}.{epoch}"))
    while newest and int(time.time()) <= newest:
        time.sleep(0.05)


def _role(strategy):
    """(is this process the chief, its name "worker-1") in a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, "chief"
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    chief = kind == "chief" or (kind == "worker" and index == 0 and not has_chief)
    return chief, f"{kind}-{index}"


def _scope_of(strategy):
    if strategy is None:
        return contextlib.nullcontext
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError("`strategy` must be a tf.distribute.Strategy, e.g. "
                         "tf.distribute.MirroredStrategy(). Received: "
                         f"strategy={type(strategy).__name__}")
    return strategy.scope


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the phase was stopped."""


class _FiniteLoss(tf_keras.callbacks.Callback):
    """Ends the run at the end of an epoch whose training loss is NaN or infinite, before
    any other callback sees that epoch's end (the guard would report NaN weights as lost
    sparsity; the checkpoint must not save them).

    Checked per epoch, not per batch: reading the loss every batch would force a device
    sync per step (measured: +2-3 ms on a 2 ms step of a small model); an epoch whose loss
    is not finite is never checkpointed, so the last good state is kept either way.
    """

    def __init__(self, planned, ckpt):
        super().__init__()
        self.planned, self.ckpt = planned, ckpt

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            raise TrainingDiverged(_diverged_message(self.planned, (epoch, float(loss)),
                                                     self.ckpt))


def _diverged_message(planned, bad, ckpt) -> str:
    epoch, loss = bad
    msg = (f"{planned.label}: the training loss of epoch {epoch} is {loss}; the phase was "
           "stopped and the run ended. ")
    if ckpt is not None and ckpt.manifest is not None:
        msg += (f"The last good checkpoint ({ckpt.manifest['epochs_done']} epochs done) is kept "
                f"in {ckpt.folder}: after fixing the cause, rerun the same call to resume "
                "from it. ")
    else:
        msg += "No checkpoint was kept (pass checkpoint_dir=... to keep the last good state). "
    return msg + ("Expected a finite loss. Common causes: a learning rate too high for this "
                  "phase (compile the model with a lower one, or clip gradients), or NaN/inf "
                  "in the inputs or labels.")


class _EpochCheckpoint(tf_keras.callbacks.Callback):
    """Saves the run at every epoch end (after every other callback: an epoch the guard or
    the finite-loss check refused is never saved)."""

    def __init__(self, ckpt, planned, merged, epochs_seen, labels):
        super().__init__()
        self.ckpt, self.planned = ckpt, planned
        self.prior = (merged, epochs_seen, labels)
        self.history: Dict[str, list] = {}
        self.ran: List[int] = []

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, [float("nan")] * len(self.ran)).append(float(value))
        self.ran.append(epoch)
        for values in self.history.values():
            values += [float("nan")] * (len(self.ran) - len(values))
        merged, seen, labels = _merged(*self.prior, self.history, self.ran, self.planned.label)
        self.ckpt.save(self.model, self.planned.index, epoch + 1, merged, seen, labels)
