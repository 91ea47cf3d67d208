"""collaborative_fit: run a plan of phases as one training run.

Each phase is one `fit()` segment on a re-wrapped, re-compiled model (same
loss and metrics, a fresh optimizer from the user's optimizer config), on one
continuous epoch axis, so the user's callbacks, History and TensorBoard see
epochs 0..N-1 once each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from keras_colopt import callbacks as cbs
from keras_colopt import checkpoint
from keras_colopt import distill as distill_mod
from keras_colopt import finetune
from keras_colopt._files import make_writable_folder
from keras_colopt.checkpoint import RunCheckpoint
from keras_colopt import stats
from keras_colopt.engines import engine_of, get_engine
from keras_colopt.engines.base import Callback
from keras_colopt.plan import Plan, PlannedPhase, resolve
from keras_colopt.tensorboard import metadata
from keras_colopt.tensorboard import summary as dashboard

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
        history: a `History` (of the model's Keras flavour) over all epochs; its
            `history["phase"]` gives each epoch's phase label.
        plan: the resolved `Plan` (epoch ranges, preservation).
        stopped_early: label of the phase a callback stopped (or, in the `result` an
            error carries, the phase the error ended), or None.
        folded: {layer: activation layer folded into it} (see DESIGN.md's
            tfmot facts: a standalone ReLU defeats preserving QAT).
        skipped: {phase label: [layers it could not touch]}.
        resumed_at: epochs already done in `checkpoint_dir` when this call
            started (None: it started from scratch).
    """

    model: object
    history: object
    plan: Plan
    stopped_early: Optional[str] = None
    folded: Dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    resumed_at: Optional[int] = None


def steps_per_epoch_of(x, batch_size=None, steps_per_epoch=None, validation_split=0.0,
                       engine=None) -> int:
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
    if engine.is_sequence(x) if engine is not None else _looks_like_sequence(x):
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


def _looks_like_sequence(x) -> bool:
    """A batched sequence (a Keras `Sequence`/`PyDataset`): indexable by batch, with a length,
    and not an array or a container of arrays."""
    return (hasattr(x, "__getitem__") and hasattr(x, "__len__")
            and not isinstance(x, (np.ndarray, list, tuple, dict)))


def _check_inputs(engine, callbacks, fit_kwargs, log_dir):
    for key in fit_kwargs:
        if key in _MANAGED:
            raise ValueError(f"collaborative_fit manages `{key}`: {_MANAGED[key]}. "
                             f"Remove it from the call. Received: {key}={fit_kwargs[key]!r}")
    allowed = engine.fit_arguments()
    unknown = sorted(set(fit_kwargs) - allowed)
    if unknown:
        raise TypeError(f"collaborative_fit got unknown keyword argument(s) {unknown}. "
                        f"Expected keyword arguments of Model.fit: {sorted(allowed - set(_MANAGED))}.")
    callbacks = engine.check_callbacks(callbacks)
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


def _held_layers(planned: PlannedPhase, pruned: List[str], clustered: List[str]) -> List[str]:
    """Layers made sparse or clustered by an earlier phase: the ones this phase does not
    touch are held fixed (see `apply_phase(hold=...)`)."""
    if planned.phase.kind == "train":
        return []
    return sorted(set(pruned) | set(clustered))


def _held_expectations(plan: Plan, planned: PlannedPhase, held: List[str],
                       pruned: List[str], clustered: List[str]):
    """What the held (frozen) layers must still show: the sparsity of the Prune phase and the
    clusters of the Cluster phase before this one."""
    before = plan.phases[:planned.index]
    prune = next((p for p in before if p.phase.kind == "prune"), None)
    cluster = next((p for p in before if p.phase.kind == "cluster"), None)
    sp = {n: prune.sparsity for n in held if prune is not None and n in pruned
          and (cluster is None or cluster.preserve_sparsity or n not in clustered)}
    cl = {n: cluster.clusters for n in held if cluster is not None and n in clustered}
    return sp, cl


def _held_per_channel(plan: Plan, planned: PlannedPhase, held_clusters) -> bool:
    """Whether held layers' clusters were made per output channel (then counted so)."""
    return bool(held_clusters) and any(p.phase.kind == "cluster" and p.per_channel
                                       for p in plan.phases[:planned.index])


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
                      custom_objects=None, distill=None, rate_policy=None,
                      **fit_kwargs) -> FitResult:
    """Trains `model` through a list of phases in one run.

    Everything is checked before any training: the phase order, the model
    (a compiled model an engine accepts: a tf_keras Sequential/Functional model), `layers=` selections,
    the fit arguments. The user's model is never modified: the phases run on a
    copy, returned as `result.model`.

    Args:
        model: a compiled model an engine accepts (a tf_keras model).
        x, y: training data as for `Model.fit`; `x` may be a `tf.data.Dataset`. With
            `distill`, `y` may be omitted: the teacher labels the data.
        phases: list of `Train`, `Prune`, `Cluster`, `Quantize`.
        validation_data: as for `Model.fit`.
        batch_size: as for `Model.fit`.
        callbacks: the user's callbacks; they see every phase (one `fit()` each,
            so `on_train_begin` runs once per phase) on one epoch axis.
        log_dir: TensorBoard directory: Keras' own scalars (loss, metrics), the
            per-layer compression scalars under `compression/`, and the keras_colopt
            dashboard's data under `colopt/` (the plan's phases, per-layer statistics
            and invariant checks per epoch; see `keras_colopt.tensorboard`).
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
        custom_objects: `{name: class or function}` that the model's layer
            configs, or a Quantize phase's `quantize_configs`, refer to by name
            (a custom activation, a quantizer, a layer inside a custom layer):
            phases rebuild layers from their configs, so the whole run is in a
            custom object scope of these (the tfmot engine's
            `quantize_scope` adds its own). The model's custom layer classes
            and the QuantizeConfig classes are found without it. Defaults to
            `None`.
        distill: `True` distils from a frozen copy of `model` as given, in every phase
            (a soft-target loss beside the labels' loss); a `keras_colopt.Distill` sets the
            teacher, temperature and weight. The epoch logs gain `distill_loss`. Defaults
            to `None` (no distillation).
        rate_policy: how a compression phase without its own `learning_rate` picks its
            rate: `None` (the default) probes a few rates around the compiled one on a
            few batches right after the phase is applied, and keeps the largest that
            trains as well as the best (`keras_colopt.RateProbe`; see
            `keras_colopt.finetune`); a `RateProbe(...)` sets the probe; `"compiled"`
            trains every phase at the compiled rate. Each phase's log line says the rate
            and why. Defaults to `None`.
        **fit_kwargs: other `Model.fit` arguments (class_weight,
            steps_per_epoch, validation_split, shuffle, ...).

    Returns:
        A `FitResult` (model, history, plan, ...).

    Example:
        >>> result = collaborative_fit(model, x, y, phases=[Train(epochs=5),
        ...     Prune(sparsity=0.5, epochs=3), Cluster(clusters=8, epochs=3),
        ...     Quantize(epochs=2)], validation_data=(xv, yv), log_dir="logs/run1")
    """
    with _visible_log(verbose), _custom_object_scope(model, custom_objects):
        return _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks,
                                  log_dir, compression_metrics, invariant_guard,
                                  guard_tolerance, verbose, initial_phase, checkpoint_dir,
                                  strategy, distill, rate_policy, fit_kwargs)


def _custom_object_scope(model, custom_objects):
    if custom_objects is None:
        return contextlib.nullcontext()
    if not isinstance(custom_objects, dict) or not all(
            isinstance(k, str) and k and v is not None for k, v in custom_objects.items()):
        raise ValueError("`custom_objects` must be a dict of names to the classes or functions "
                         "they stand for. Expected e.g. custom_objects={'MyActivation': "
                         f"MyActivation}}. Received: custom_objects={custom_objects!r}")
    engine = engine_of(model)  # none: the model is refused with its reason right after
    return (engine.custom_object_scope(custom_objects) if engine is not None
            else contextlib.nullcontext())


def _check_initial_phase(initial_phase, plan: Plan) -> int:
    if (isinstance(initial_phase, bool) or not isinstance(initial_phase, int)
            or not 0 <= initial_phase < len(plan)):
        raise ValueError(
            "`initial_phase` must be the index of a phase to start from. Expected an int in "
            f"[0, {len(plan) - 1}] for these {len(plan)} phases. Received: "
            f"initial_phase={initial_phase!r}")
    return initial_phase


def _check_schedules(plan: Plan, compiled_rate, steps_per_epoch: int) -> None:
    """Raises, before training, for a phase whose rate cannot be built (a cosine with a
    compiled schedule and no `learning_rate` to start from)."""
    for planned in plan.phases:
        planned.phase.schedule_for(compiled_rate, steps_per_epoch)


@dataclasses.dataclass
class _Run:
    """The state one `collaborative_fit` call carries from step to step.

    `model` is the model the next phase starts from (after a phase: that phase's wrapped
    model); `history`, `epochs` and `labels` cover every epoch done so far (resumed ones
    included); `last_good` is what an error hands back: the model of the last epoch that
    passed every check, with its weights and the history up to it.
    """

    plan: Plan
    engine: object
    steps: int
    compile_cfg: dict
    scope: object
    start: int
    model: object = None
    folded: Dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    ckpt: Optional[RunCheckpoint] = None
    resume: object = None
    history: Dict[str, list] = dataclasses.field(default_factory=dict)
    epochs: List[int] = dataclasses.field(default_factory=list)
    labels: List[str] = dataclasses.field(default_factory=list)
    epoch: int = 0
    pruned: List[str] = dataclasses.field(default_factory=list)
    clustered: List[str] = dataclasses.field(default_factory=list)
    stopped: Optional[str] = None
    last_good: Optional[tuple] = None
    phase_label: Optional[str] = None
    distill: Optional[distill_mod.Distill] = None
    teacher: object = None
    policy: object = None
    probe_data: object = None  # finetune.ProbeData, or why there is none (a str)

    def record(self, new: Dict[str, list], ran: List[int], label: str) -> None:
        self.history, self.epochs, self.labels = _merged(self.history, self.epochs,
                                                         self.labels, new, ran, label)


def _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks, log_dir,
                       compression_metrics, invariant_guard, guard_tolerance, verbose,
                       initial_phase, checkpoint_dir, strategy, distill, rate_policy,
                       fit_kwargs) -> FitResult:
    plan = resolve(phases)
    policy = finetune.resolve_policy(rate_policy)
    settings = distill_mod.resolve(distill)
    start = _check_initial_phase(initial_phase, plan)
    engine = get_engine(model)
    user_callbacks = _check_inputs(engine, callbacks, fit_kwargs, log_dir)
    if y is None and settings is None and _is_arrays(x):
        raise ValueError(
            f"`y` is None, and `x` holds arrays of inputs only: model '{model.name}' has no "
            "labels to train on. Expected labels `y`, or `distill=True` to compress with "
            "unlabelled data (a frozen copy of the model labels it). Received: y=None")
    if invariant_guard not in (True, False, "warn"):
        raise ValueError("`invariant_guard` must be True, False or 'warn'. "
                         f"Received: invariant_guard={invariant_guard!r}")
    if not isinstance(compression_metrics, bool):
        raise ValueError("`compression_metrics` must be a bool. "
                         f"Received: compression_metrics={compression_metrics!r}")
    steps = steps_per_epoch_of(x, batch_size, fit_kwargs.get("steps_per_epoch"),
                               fit_kwargs.get("validation_split", 0.0), engine=engine)
    scope = _scope_of(strategy)
    if strategy is not None:
        engine.check_strategy(model, strategy)
    run = _Run(plan=plan, engine=engine, steps=steps, compile_cfg=engine.compile_config(model),
               scope=scope, start=start, policy=policy)
    run.probe_data = _probe_data(run, x, y, batch_size, strategy)
    _check_schedules(plan, _compiled_rate(run), steps)
    chief, worker = _role(strategy)
    if not chief:
        # Another worker of a multi-worker run: the chief writes the logs the user reads;
        # this one keeps its own checkpoint (every worker saves and restores its variables).
        log_dir = None
        if checkpoint_dir is not None:
            checkpoint_dir = os.path.join(os.fspath(checkpoint_dir), worker)

    if settings is not None:
        run.teacher = distill_mod.make_teacher(engine, model, settings, run.scope)
        run.distill = settings
        if settings.teacher is None and plan.phases[run.start].phase.kind == "train":
            log.warning("Distilling from the model as given, before its Train phase: the "
                        "Train phase learns from an untrained teacher. Give "
                        "Distill(teacher=...) a trained model, or start with a compression "
                        "phase.")
    _prepare_model(run, model)
    # Folders are created once every check has passed, right before training.
    _open_outputs(run, model, checkpoint_dir, log_dir)
    _applied_before(run)
    if log_dir is not None:  # the dashboard's phase bands
        dashboard.plan(log_dir, plan)
    shared = _SharedCallbacks(
        metrics=cbs.CompressionMetrics(log_dir=log_dir) if compression_metrics else None,
        tensorboard=(engine.tensorboard_callback(os.fspath(log_dir))
                     if log_dir is not None else None),
        progbar=verbose != 0 and not any(engine.is_progbar(c) for c in user_callbacks),
        user=user_callbacks, guard=invariant_guard, tolerance=guard_tolerance,
        log_dir=log_dir)
    try:
        before = cbs.layer_stats(run.model, engine)
        bests = cbs.BestValueReset(user_callbacks)
        for planned in plan.phases[run.start:]:
            if planned.index > run.start:
                bests.reset(planned.label)
            run.phase_label = planned.label
            touched, held, companions, rate, resuming = _enter_phase(run, planned)
            if resuming:
                log.info("Resumed from %s: %d epoch(s) done, in %s; continuing at epoch %d.",
                         run.ckpt.folder, run.resume.epochs_done, planned.label, run.epoch)
                if log_dir is not None:
                    dashboard.close(log_dir)  # its next file must sort after the marker
                    _restart_tensorboard_runs(log_dir, run.epoch)
                    dashboard.plan(log_dir, plan)  # again: the marker may have dropped it
                before = cbs.layer_stats(run.model, engine)
            if run.epoch >= planned.end_epoch:  # resumed at the end of this phase
                continue
            phase_cbs = _phase_callbacks(run, planned, shared, touched, held, companions)
            log.info("Phase %d/%d: %s, epochs %d-%d, learning rate %s", planned.index + 1,
                     len(plan), planned.label, run.epoch, planned.end_epoch - 1, rate)
            _train_phase(run, planned, phase_cbs, x, y, batch_size, validation_data, verbose,
                         fit_kwargs)
            after = cbs.layer_stats(run.model, engine)
            log.info("%s", _transition_line(planned.label, before, after))
            before = after
            if run.stopped:
                break
    except BaseException as error:
        _hand_back(run, error)
        distill_mod.remove(run.model)
        distill_mod.remove(getattr(getattr(error, "result", None), "model", None))
        raise
    finally:
        if log_dir is not None:
            dashboard.close(log_dir)
    engine.settle(run.model)  # get_weights() shows the zeros and shared values
    distill_mod.remove(run.model)
    return FitResult(model=run.model, history=_history(run.model, run), plan=plan,
                     stopped_early=run.stopped, folded=run.folded, skipped=run.skipped,
                     resumed_at=None if run.resume is None else run.resume.epochs_done)


def _is_arrays(x) -> bool:
    """Whether `x` is in-memory inputs (an array, or a list/dict of them), which cannot carry
    labels, unlike a dataset or a generator."""
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(v, (np.ndarray, tf.Tensor)) for v in x)
    return isinstance(x, (np.ndarray, tf.Tensor))


def _prepare_model(run: _Run, model) -> None:
    """The working copy of the user's model, made ready for the plan and checked against it
    (folded activations, preflight); logs the plan."""
    engine, plan = run.engine, run.plan
    nested = engine.nested_models(model)
    with run.scope():
        # tfmot wraps top-level layers only: nested models are opened, in a copy (it refuses
        # a nested model called twice, which clone_model would copy into untied layers).
        work = engine.flatten_nested(model) if nested else engine.clone_model(model)
    if nested:
        log.info("Model '%s' has nested model(s) %s: flattened into one graph of %d layers, "
                 "named by path ('%s/...'), so that every phase reaches their layers.",
                 model.name, ", ".join(nested), len(work.layers), nested[0])
    if any(p.phase.kind == "quantize" and (p.preserve_sparsity or p.preserve_clusters)
           for p in plan):
        pairs, _ = engine.fold_plan(work)
        if pairs:
            with run.scope():
                work = engine.fold_activations(work, pairs)
            run.folded = {w: a for w, (a, _) in pairs.items()}
            log.info("Folded standalone activation layer(s) into the layer before them, so that "
                     "preserving QAT keeps them: %s",
                     ", ".join(f"{a} -> {w}" for w, a in run.folded.items()))
    run.skipped = engine.preflight(work, plan)
    for label, names in run.skipped.items():
        if names:
            log.warning("%s cannot touch %d layer(s) with weights; they stay as they are: %s",
                        label, len(names), ", ".join(names))
    for p in plan:
        if p.phase.kind == "quantize" and not p.preserve_sparsity and any(
                q.phase.kind == "prune" for q in plan.phases[:p.index]):
            log.warning("%s does not preserve sparsity (preserve=%r): the pruned zeros will "
                        "not survive quantization-aware training.", p.label, p.phase.preserve)
    log.info("collaborative_fit plan (%d epochs, %d steps/epoch):\n%s%s", plan.total_epochs,
             run.steps, plan.describe(),
             f"\n  starting at phase {run.start} ({plan.phases[run.start].label}): the ones "
             "before were already applied to the model" if run.start else "")
    run.model = work
    run.epoch = plan.phases[run.start].start_epoch


def _applied_before(run: _Run) -> None:
    """What the phases before the first one to train (`initial_phase`, or where a checkpoint
    resumes) touched: the later phases preserve and check it."""
    for planned in run.plan.phases[:run.start]:
        if planned.phase.kind == "prune":
            run.pruned = run.engine.select_layers(run.model, planned.phase, "prune")[0]
        elif planned.phase.kind == "cluster":
            run.clustered = run.engine.select_layers(run.model, planned.phase, "cluster")[0]


def _open_outputs(run: _Run, model, checkpoint_dir, log_dir) -> None:
    """Creates the checkpoint and log folders; a checkpoint of this run sets where to resume."""
    if checkpoint_dir is not None:
        run.ckpt = RunCheckpoint(checkpoint_dir, meta={
            "log_dir": None if log_dir is None else os.path.abspath(os.fspath(log_dir))})
        run.resume = run.ckpt.open(checkpoint.fingerprint(
            run.plan, model, run.steps, run.start,
            distill=None if run.distill is None else run.distill.get_config()))
    if log_dir is not None:
        make_writable_folder(log_dir, "`log_dir`", "TensorBoard logs (`log_dir`)")
    if run.resume is not None:
        run.history, run.epochs, run.labels = (run.resume.history, run.resume.epochs,
                                               run.resume.labels)
        run.epoch, run.start = run.resume.epochs_done, run.resume.phase


def _compiled_rate(run: _Run):
    return run.compile_cfg["optimizer_config"].get("learning_rate")


def _probe_data(run: _Run, x, y, batch_size, strategy):
    """The rate probe's batches (`finetune.ProbeData`), or why there are none."""
    if not isinstance(run.policy, finetune.RateProbe) or all(
            p.phase.kind == "train" or p.phase.learning_rate is not None for p in run.plan):
        return "not needed"
    if strategy is not None:
        return "a distribution strategy trains the phases (workers would probe apart)"
    data, why = finetune.probe_data(x, y, batch_size, run.policy)
    return data if data is not None else why


def _phase_rate(run: _Run, planned: PlannedPhase, model, companions,
                resuming) -> finetune.PhaseRate:
    """Chooses the phase's rate (`finetune.choose`), kept in the checkpoint so that a
    resumed phase trains at the rate it started with."""
    key, compiled = str(planned.index), _compiled_rate(run)
    saved = ((run.ckpt.manifest or {}).get("meta", {}).get("rates", {})
             if resuming and run.ckpt is not None else {})
    if key in saved and planned.phase.learning_rate is None:
        choice = finetune.RateChoice(saved[key], "as chosen before the resume")
    else:
        def compile_at(r):
            run.engine.compile_like(model, run.compile_cfg, r)
        with run.engine.quiet_expected_warnings(model):
            choice = finetune.choose(run.policy, planned.phase, compiled, run.probe_data,
                                     compile_at, model, companions)
    if run.ckpt is not None and choice.rate is not None:
        run.ckpt.meta.setdefault("rates", {})[key] = choice.rate
    return finetune.phase_schedule(planned.phase, choice, compiled, run.steps)


def _enter_phase(run: _Run, planned: PlannedPhase):
    """Wraps and compiles the model for one phase (restoring its state when resuming).

    Returns:
        (touched, held, companions, rate, resuming)
    """
    engine, ckpt = run.engine, run.ckpt
    resuming = run.resume is not None and planned.index == run.resume.phase
    with run.scope():
        if resuming:
            run.model.set_weights(ckpt.load_entry(planned.index))
        # The previous phase's wrappers come off once (strip clones the model): the phase
        # entry, the snapshot and the wrapping all start from this.
        stripped = engine.strip(run.model) if planned.phase.kind != "train" else run.model
        if run.epochs:  # an error from here on hands back the model as the last phase left it
            run.last_good = _LastGood(run.history, run.epochs, run.labels,
                                      snapshot=engine.snapshot(stripped))
        if ckpt is not None and not resuming:
            ckpt.save_entry(planned.index, stripped.get_weights())
        held = _held_layers(planned, run.pruned, run.clustered)
        model, companions, touched = engine.apply_phase(stripped, planned, run.steps,
                                                        hold=held)
        held = sorted(set(held) - set(touched))
        rate = _phase_rate(run, planned, model, companions, resuming)
        engine.compile_like(model, run.compile_cfg, rate.schedule,
                            step_offset=planned.start_epoch * run.steps)
        if run.distill is not None:
            companions = list(companions) + engine.distillation(model, run.teacher,
                                                                run.distill)
        if resuming:
            ckpt.restore(model, run.resume.state)
    if planned.phase.kind == "quantize" and planned.preserve_clusters:
        lost = engine.unpreserved_clusters(model, set(run.clustered) & set(touched))
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
    if held and not resuming:
        log.info("%s does not touch layer(s) %s, which carry the work of an earlier "
                 "phase (zeros or clusters): they are frozen during it, so that it keeps "
                 "their compression.", planned.label, ", ".join(held))
    run.model = model
    if planned.phase.kind == "prune":
        run.pruned = list(touched)
    elif planned.phase.kind == "cluster":
        run.clustered = list(touched)
    return touched, held, companions, rate, resuming


@dataclasses.dataclass
class _SharedCallbacks:
    """The callbacks every phase shares, and how to build the per-phase ones."""

    metrics: object
    tensorboard: object
    progbar: bool
    user: list
    guard: object
    tolerance: float
    log_dir: object = None


def _phase_callbacks(run: _Run, planned: PlannedPhase, shared: _SharedCallbacks, touched,
                     held, companions) -> list:
    """The callbacks of one phase's fit(), in order: the finite-loss check first, the epoch
    record (and checkpoint) last, so that it keeps what every other callback accepted."""
    phase_cbs = [_FiniteLoss(planned, run.ckpt)] + list(companions)
    if shared.metrics is not None:
        phase_cbs.append(shared.metrics)
    if shared.guard:
        sp, cl = _phase_expectations(planned, touched, run.pruned, run.clustered)
        hsp, hcl = _held_expectations(run.plan, planned, held, run.pruned, run.clustered)
        sp, cl = {**hsp, **sp}, {**hcl, **cl}
        if sp or cl:
            guard = cbs.InvariantGuard(
                sparsity=sp or None, clusters=cl or None,
                mode="warn" if shared.guard == "warn" else "raise",
                tolerance=shared.tolerance, phase=planned.label, log_dir=shared.log_dir,
                per_channel=planned.per_channel or _held_per_channel(run.plan, planned, hcl))
            guard._kernels_from = shared.metrics  # right after it: reads the kernels once
            phase_cbs.append(guard)
    if shared.progbar:
        phase_cbs.append(run.engine.progbar_callback())
    phase_cbs += shared.user
    if shared.tensorboard is not None:
        phase_cbs.append(shared.tensorboard)
    phase_cbs.append(_EpochEnd(run, planned))
    return phase_cbs


def _train_phase(run: _Run, planned: PlannedPhase, phase_cbs, x, y, batch_size,
                 validation_data, verbose, fit_kwargs) -> None:
    """One fit() segment on the run's epoch axis."""
    model, end = run.model, planned.end_epoch
    with run.engine.quiet_expected_warnings(model):
        h = model.fit(x, y, batch_size=batch_size, epochs=end, initial_epoch=run.epoch,
                      validation_data=validation_data, callbacks=phase_cbs,
                      verbose=verbose, **fit_kwargs)
    ran = list(h.epoch)
    run.record(h.history, ran, planned.label)
    run.epoch += len(ran)
    if model.stop_training and run.epoch < end:
        run.stopped = planned.label
        log.warning("A callback stopped training during %s at epoch %d; the remaining "
                    "phases were not run.", planned.label, run.epoch - 1)


def _history(model, run: _Run):
    """A History over the run's epochs."""
    values = {k: list(v) for k, v in run.history.items()}
    values["phase"] = list(run.labels)
    return run.engine.history(model, run.epochs, values)


class _EpochEnd(Callback):
    """At every epoch end, after every other callback (an epoch that the guard or the
    finite-loss check refused never gets here): records the epoch, keeps its weights as the
    run's last good state, and checkpoints it."""

    def __init__(self, run: _Run, planned: PlannedPhase):
        super().__init__()
        self.run, self.planned = run, planned
        self.prior = (run.history, run.epochs, run.labels)
        self.logs: Dict[str, list] = {}
        self.ran: List[int] = []

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.logs.setdefault(key, [float("nan")] * len(self.ran)).append(float(value))
        self.ran.append(epoch)
        for values in self.logs.values():
            values += [float("nan")] * (len(self.ran) - len(values))
        merged, seen, labels = _merged(*self.prior, self.logs, self.ran, self.planned.label)
        self.run.last_good = _LastGood(merged, seen, labels, model=self.model,
                                       weights=self.model.get_weights())
        if self.run.ckpt is not None:
            self.run.ckpt.save(self.model, self.planned.index, epoch + 1, merged, seen, labels)


@dataclasses.dataclass
class _LastGood:
    """The run's last good state: the history up to it, and either the training model and
    its weights at an epoch end, or a snapshot of the model a phase started from."""

    history: Dict[str, list]
    epochs: List[int]
    labels: List[str]
    model: object = None
    weights: Optional[list] = None
    snapshot: object = None


def _hand_back(run: _Run, error: BaseException) -> None:
    """Gives an error raised after some training the run's last good state.

    Sets on `error`: `result`, a `FitResult` whose model is the last good one and whose
    history ends there: the training model restored to the weights of its last epoch that
    passed every check, or, for an error before the phase's first epoch ended, a new copy
    of the model the phase started from (unwrapped: export it, or continue from it with
    `initial_phase=`); `model`, the same model, unless the error carries one already
    (`InvariantViolation`: then its weights when the violation was found are kept in
    `error.model_at_error_weights`); `checkpoint_dir`, the folder holding the last good
    checkpoint, or None; and a note saying where they are.
    """
    where = run.ckpt.folder if run.ckpt is not None and run.ckpt.manifest is not None else None
    error.checkpoint_dir = where
    good = run.last_good
    if good is None:
        if where is not None:
            _note(error, f"collaborative_fit: the last good checkpoint is in {where}; rerun the "
                         "same call to resume from it.")
        return
    try:
        if good.snapshot is not None:
            with run.scope():
                model = run.engine.rebuild(good.snapshot)
        else:
            model = good.model
            if getattr(error, "model", None) is model:  # restored below
                error.model_at_error_weights = model.get_weights()
            model.set_weights(good.weights)
    except Exception as e:  # noqa: BLE001 (the error at hand is the one to raise)
        _note(error, f"collaborative_fit: the last good model could not be handed back "
                     f"({type(e).__name__}: {e}).")
        return
    run.history, run.epochs, run.labels = good.history, good.epochs, good.labels
    error.result = FitResult(model=model, history=_history(model, run), plan=run.plan,
                             stopped_early=run.phase_label, folded=run.folded,
                             skipped=run.skipped,
                             resumed_at=None if run.resume is None else run.resume.epochs_done)
    if getattr(error, "model", None) is None:
        error.model = model
    _note(error, f"collaborative_fit: {type(error).__name__} during {run.phase_label}, after "
                 f"{len(good.epochs)} epoch(s) of training. The last good model (after epoch "
                 f"{good.epochs[-1]}, {good.labels[-1]}) is handed back: error.result.model, "
                 "with its history in error.result.history"
                 + (f"; the last good checkpoint is in {where} (rerun the same call to resume)."
                    if where else "."))


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:  # Python 3.10: no notes; the attributes are still set
        error.__dict__.setdefault("__notes__", []).append(text)


def _merged(merged, epochs_seen, labels, new: Dict[str, list], ran: List[int], label: str):
    """The run's history so far with one `fit()`'s history appended (new copies): a key
    that appears or disappears between phases is padded with NaN."""
    out = {k: list(v) for k, v in merged.items()}
    for key in set(out) | set(new):
        out.setdefault(key, [float("nan")] * len(epochs_seen))
        out[key] += [float(v) for v in new.get(key, [float("nan")] * len(ran))]
    return out, list(epochs_seen) + list(ran), list(labels) + [label] * len(ran)


# The folders a run writes its event files to, under its log_dir.
RUN_FOLDERS = ("train", "validation", "compression", metadata.RUN_FOLDER)


def _restart_tensorboard_runs(log_dir, epoch: int) -> None:
    """Tells TensorBoard that this run's folders under `log_dir` (`RUN_FOLDERS`: Keras'
    train/ and validation/, compression/, the dashboard's colopt/) restart at `epoch`; any
    other folder there (another run's, in a shared parent) is left as it is.

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
    for root in (os.path.join(os.fspath(log_dir), sub) for sub in RUN_FOLDERS):
        files = os.listdir(root) if os.path.isdir(root) else []
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


class _FiniteLoss(Callback):
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
        msg += ("No checkpoint was kept (pass checkpoint_dir=... to keep one); the last good "
                "model is handed back as error.result.model. ")
    return msg + ("Expected a finite loss. Common causes: a learning rate too high for this "
                  "phase (compile the model with a lower one, or clip gradients), or NaN/inf "
                  "in the inputs or labels.")
