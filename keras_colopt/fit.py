"""collaborative_fit: run a plan of phases as one training run.

Each phase is one `fit()` segment on a re-wrapped, re-compiled model (same
loss and metrics, a fresh optimizer from the user's optimizer config), on one
continuous epoch axis, so the user's callbacks, History and TensorBoard see
epochs 0..N-1 once each.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Optional


from keras_colopt import checkpoint
from keras_colopt import distill as distill_mod
from keras_colopt import finetune, fit_inputs, monitors, recovery
from keras_colopt._files import make_writable_folder
from keras_colopt.checkpoint import RunCheckpoint
from keras_colopt.engines import get_engine
from keras_colopt.kernels import layer_stats, transition_line
from keras_colopt.plan import Plan, PlannedPhase, resolve
from keras_colopt.recovery import TrainingDiverged
from keras_colopt.runner import PhaseRunner
from keras_colopt.tensorboard import summary as dashboard

log = logging.getLogger("keras_colopt")

__all__ = ["FitResult", "TrainingDiverged", "collaborative_fit"]


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
    with fit_inputs.visible_log(verbose), fit_inputs.custom_object_scope(model, custom_objects):
        return _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks,
                                  log_dir, compression_metrics, invariant_guard,
                                  guard_tolerance, verbose, initial_phase, checkpoint_dir,
                                  strategy, distill, rate_policy, fit_kwargs)


@dataclasses.dataclass
class _Run:
    """The state one `collaborative_fit` call carries from step to step.

    `model` is the model the next phase starts from (after a phase: that phase's wrapped
    model); `history`, `epochs` and `labels` cover every epoch done so far (resumed ones
    included); `last_good` is what an error hands back (`recovery.LastGood`). The plan's
    bookkeeping (layers touched, rates, guards) is the `runner`'s.
    """

    plan: Plan
    engine: object
    runner: PhaseRunner
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
    stopped: Optional[str] = None
    last_good: Optional[recovery.LastGood] = None
    distill: Optional[distill_mod.Distill] = None
    teacher: object = None

    def record(self, new: Dict[str, list], ran: List[int], label: str) -> None:
        self.history, self.epochs, self.labels = recovery.history_with(
            self.history, self.epochs, self.labels, new, ran, label)

    def result(self, model, stopped) -> FitResult:
        values = {k: list(v) for k, v in self.history.items()}
        values["phase"] = list(self.labels)
        return FitResult(model=model, history=self.engine.history(model, self.epochs, values),
                         plan=self.plan, stopped_early=stopped, folded=self.folded,
                         skipped=self.skipped,
                         resumed_at=None if self.resume is None else self.resume.epochs_done)


def _collaborative_fit(model, x, y, phases, validation_data, batch_size, callbacks, log_dir,
                       compression_metrics, invariant_guard, guard_tolerance, verbose,
                       initial_phase, checkpoint_dir, strategy, distill, rate_policy,
                       fit_kwargs) -> FitResult:
    plan = resolve(phases)
    policy = finetune.resolve_policy(rate_policy)
    settings = distill_mod.resolve(distill)
    start = fit_inputs.check_initial_phase(initial_phase, plan)
    engine = get_engine(model)
    user_callbacks = fit_inputs.check_inputs(engine, callbacks, fit_kwargs, log_dir)
    fit_inputs.check_labels(model, x, y, distilling=settings is not None)
    fit_inputs.check_flags(invariant_guard, compression_metrics)
    steps = fit_inputs.steps_per_epoch_of(x, batch_size, fit_kwargs.get("steps_per_epoch"),
                                          fit_kwargs.get("validation_split", 0.0), engine=engine)
    scope = fit_inputs.scope_of(strategy)
    if strategy is not None:
        engine.check_strategy(model, strategy)
    chief, worker = fit_inputs.role(strategy)
    if not chief:
        # Another worker of a multi-worker run: the chief writes the logs the user reads;
        # this one keeps its own checkpoint (every worker saves and restores its variables).
        log_dir = None
        if checkpoint_dir is not None:
            checkpoint_dir = os.path.join(os.fspath(checkpoint_dir), worker)
    runner = PhaseRunner(plan, engine, steps, engine.compile_config(model), policy,
                         _probe_data(plan, policy, x, y, batch_size, strategy),
                         invariant_guard, guard_tolerance, log_dir, user_callbacks)
    runner.check_schedules()
    run = _Run(plan=plan, engine=engine, runner=runner, scope=scope, start=start)
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
    runner.applied_before(run.model, run.start)
    if log_dir is not None:  # the dashboard's phase bands
        dashboard.plan(log_dir, plan)
    metrics = monitors.CompressionMetrics(log_dir=log_dir) if compression_metrics else None
    shared = (metrics, engine.tensorboard_callback(os.fspath(log_dir)) if log_dir else None,
              verbose != 0 and not any(engine.is_progbar(c) for c in user_callbacks),
              user_callbacks)
    try:
        before = layer_stats(run.model, engine)
        for planned in plan.phases[run.start:]:
            phase_cbs, resuming = _enter_phase(run, planned, shared)
            if resuming:
                log.info("Resumed from %s: %d epoch(s) done, in %s; continuing at epoch %d.",
                         run.ckpt.folder, run.resume.epochs_done, planned.label, run.epoch)
                if log_dir is not None:
                    dashboard.close(log_dir)  # its next file must sort after the marker
                    dashboard.restart_runs(log_dir, run.epoch)
                    dashboard.plan(log_dir, plan)  # again: the marker may have dropped it
                before = layer_stats(run.model, engine)
            if run.epoch >= planned.end_epoch:  # resumed at the end of this phase
                continue
            _train_phase(run, planned, phase_cbs, x, y, batch_size, validation_data, verbose,
                         fit_kwargs)
            after = layer_stats(run.model, engine)
            log.info("%s", transition_line(planned.label, before, after))
            before = after
            if run.stopped:
                break
    except BaseException as error:
        recovery.hand_back(run, error, runner.label, lambda m: run.result(m, runner.label))
        distill_mod.remove(run.model)
        distill_mod.remove(getattr(getattr(error, "result", None), "model", None))
        raise
    finally:
        if log_dir is not None:
            dashboard.close(log_dir)
    engine.settle(run.model)  # get_weights() shows the zeros and shared values
    distill_mod.remove(run.model)
    return run.result(run.model, run.stopped)


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
    run.skipped = run.runner.preflight(work)
    log.info("collaborative_fit plan (%d epochs, %d steps/epoch):\n%s%s", plan.total_epochs,
             run.runner.steps, plan.describe(),
             f"\n  starting at phase {run.start} ({plan.phases[run.start].label}): the ones "
             "before were already applied to the model" if run.start else "")
    run.model = work
    run.epoch = plan.phases[run.start].start_epoch


def _open_outputs(run: _Run, model, checkpoint_dir, log_dir) -> None:
    """Creates the checkpoint and log folders; a checkpoint of this run sets where to resume."""
    if checkpoint_dir is not None:
        run.ckpt = RunCheckpoint(checkpoint_dir, meta={
            "log_dir": None if log_dir is None else os.path.abspath(os.fspath(log_dir))})
        run.resume = run.ckpt.open(checkpoint.fingerprint(
            run.plan, model, run.runner.steps, run.start,
            distill=None if run.distill is None else run.distill.get_config()))
    if log_dir is not None:
        make_writable_folder(log_dir, "`log_dir`", "TensorBoard logs (`log_dir`)")
    if run.resume is not None:
        run.history, run.epochs, run.labels = (run.resume.history, run.resume.epochs,
                                               run.resume.labels)
        run.epoch, run.start = run.resume.epochs_done, run.resume.phase


def _probe_data(plan: Plan, policy, x, y, batch_size, strategy):
    """The rate probe's batches (`finetune.ProbeData`), or why there are none."""
    if not isinstance(policy, finetune.RateProbe) or all(
            p.phase.kind == "train" or p.phase.learning_rate is not None for p in plan):
        return "not needed"
    if strategy is not None:
        return "a distribution strategy trains the phases (workers would probe apart)"
    data, why = finetune.probe_data(x, y, batch_size, policy)
    return data if data is not None else why


def _enter_phase(run: _Run, planned: PlannedPhase, shared):
    """Wraps and compiles the model for one phase (restoring its state when resuming) and
    builds its callbacks, in order: the finite-loss check first, the epoch record (and
    checkpoint) last, so that it keeps what every other callback accepted.

    Returns:
        (callbacks, resuming)
    """
    engine, ckpt, runner = run.engine, run.ckpt, run.runner
    metrics, tensorboard, progbar, user = shared
    resuming = run.resume is not None and planned.index == run.resume.phase
    saved = ((ckpt.manifest or {}).get("meta", {}).get("rates", {})
             if resuming and ckpt is not None else {})
    with run.scope():
        if resuming:
            run.model.set_weights(ckpt.load_entry(planned.index))
        # The previous phase's wrappers come off once (strip clones the model): the phase
        # entry, the snapshot and the wrapping all start from this.
        stripped = engine.strip(run.model) if planned.phase.kind != "train" else run.model
        if run.epochs:  # an error from here on hands back the model as the last phase left it
            run.last_good = recovery.LastGood(run.history, run.epochs, run.labels,
                                              snapshot=engine.snapshot(stripped))
        if ckpt is not None and not resuming:
            ckpt.save_entry(planned.index, stripped.get_weights())

        def apply(held):
            return engine.apply_phase(stripped, planned, runner.steps, hold=held)

        def compile_at(model, rate):
            engine.compile_like(model, runner.cfg, rate,
                                step_offset=planned.start_epoch * runner.steps)
        entry = runner.enter(planned, apply, compile_at, saved.get(str(planned.index)),
                             resumed=resuming)
        if ckpt is not None and entry.rate.chosen is not None:
            ckpt.meta.setdefault("rates", {})[str(planned.index)] = entry.rate.chosen
        companions = entry.companions
        if run.distill is not None:
            companions += engine.distillation(entry.model, run.teacher, run.distill)
        if resuming:
            ckpt.restore(entry.model, run.resume.state)
    run.model = entry.model
    guard = runner.guard(planned, entry.touched, entry.held, kernels_from=metrics)
    phase_cbs = ([recovery.FiniteLoss(planned, ckpt)] + companions
                 + [cb for cb in (metrics, guard) if cb is not None]  # the guard right after
                 + ([engine.progbar_callback()] if progbar else []) + user
                 + ([tensorboard] if tensorboard is not None else [])
                 + [recovery.EpochRecord(run, planned)])
    if run.epoch < planned.end_epoch:  # not resumed at its end
        log.info("Phase %d/%d: %s, epochs %d-%d, learning rate %s", planned.index + 1,
                 len(run.plan), planned.label, run.epoch, planned.end_epoch - 1, entry.rate)
    return phase_cbs, resuming


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
