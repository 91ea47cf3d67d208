"""CollaborativeOptimization: the whole plan inside one plain `model.fit`.

Phases are switched in place at epoch boundaries through the same `PhaseRunner` as
`collaborative_fit` (see `keras_colopt.runner`).
"""

from __future__ import annotations

import logging
import os

from keras_colopt import distill as distill_mod
from keras_colopt import finetune
from keras_colopt.engines import get_engine
from keras_colopt.engines.base import Callback
from keras_colopt.plan import resolve
from keras_colopt.runner import PhaseRunner, sibling_callbacks
from keras_colopt.tensorboard import summary as dashboard

log = logging.getLogger("keras_colopt")


class CollaborativeOptimization(Callback):
    """The whole plan inside one plain `model.fit`: phases switched at epoch boundaries.

    On a Keras 3 model (whose engine compresses layers in place), each phase starts at its
    epoch: the previous phase's compression is baked into the kernels, the phase is applied
    to the same model object, and training goes on with a fresh optimizer like the compiled
    one (at the phase's `learning_rate`, or the rate a short probe picks on `probe_data`, as
    in `collaborative_fit`; a compiled schedule runs on the global step). One History, the
    user's other callbacks untouched; after `fit` the model is ready for
    `export.to_tflite`. At every epoch end the plan's invariants are checked (an
    `InvariantGuard` with the plan's expectations), unless `guard=False`.

    The phases' epochs must add up to the `epochs` given to `fit` (a leading `Train` phase
    counts too): a mismatch is an error at `on_train_begin`, before the first step, as is a
    model of an engine that cannot switch in place (tf_keras: use `collaborative_fit`).

    Args:
        phases: list of `Train`, `Prune`, `Cluster` (as for `collaborative_fit`).
        guard: check the plan's invariants at every epoch end (`True`), only warn
            (`"warn"`), or not (`False`). Defaults to `True`.
        tolerance: the guard's sparsity tolerance. Defaults to `0.005`.
        distill: as for `collaborative_fit`: `True` distils, in every phase, from a frozen
            copy of the model as it is when fit begins; a `keras_colopt.Distill` sets the
            teacher, temperature and weight. Defaults to `None`.
        log_dir: the run's TensorBoard log directory (give `CompressionMetrics` the same):
            the plan (phase labels and epochs) and the guard's checks are written there
            for the keras_colopt dashboard. Defaults to `None`.
        probe_data: `(x, y)` arrays (a few hundred training examples are enough) or a
            labelled `tf.data.Dataset` for the rate probe of each compression phase that
            has no `learning_rate` (see `keras_colopt.finetune`): a callback does not see
            the batches `fit` trains on. Without it, such a phase trains at the compiled
            rate (`finetune.FALLBACK_FRACTION`), and the log says so.
            Defaults to `None`.
        rate_policy: as for `collaborative_fit`. Defaults to `None` (the probe).
        batch_size: the probe's batch size with array `probe_data`. Defaults to `32`.

    The other callbacks of the same `fit` that keep a best value (`ModelCheckpoint(
    save_best_only=True)`, `EarlyStopping(restore_best_weights=True)`, `ReduceLROnPlateau`)
    start their best again at each phase switch, so the file they leave and the weights they
    restore hold the plan's invariants (the best of the last phase, not an uncompressed epoch).

    Example:
        >>> model.fit(x, y, epochs=5, callbacks=[colopt.callbacks.CollaborativeOptimization(
        ...     [colopt.Prune(sparsity=0.5, epochs=2), colopt.Cluster(clusters=8, epochs=3)])])
    """

    def __init__(self, phases, guard=True, tolerance=0.005, distill=None, log_dir=None,
                 probe_data=None, rate_policy=None, batch_size=32):
        super().__init__()
        self.plan = resolve(phases)  # a bad order is refused here, before fit
        self.rate_policy = finetune.resolve_policy(rate_policy)
        self._probe = "no probe_data given to CollaborativeOptimization"
        if probe_data is not None and isinstance(self.rate_policy, finetune.RateProbe):
            if isinstance(probe_data, (tuple, list)) and len(probe_data) == 2:
                data, why = finetune.probe_data(probe_data[0], probe_data[1], batch_size,
                                                self.rate_policy)
            else:
                data, why = finetune.probe_data(probe_data, None, batch_size,
                                                self.rate_policy)
            if data is None:
                raise ValueError(
                    f"CollaborativeOptimization: `probe_data` cannot be probed on: {why}. "
                    "Expected (x, y) arrays of training examples, or a tf.data.Dataset of "
                    "(x, y) batches. Received: probe_data of type "
                    f"{type(probe_data).__name__}")
            self._probe = data
        self.distill = distill_mod.resolve(distill)
        self._distill_callbacks = []
        if guard not in (True, False, "warn"):
            raise ValueError("CollaborativeOptimization: `guard` must be True, False or "
                             f"'warn'. Received: guard={guard!r}")
        self.guard_mode = guard
        self.tolerance = tolerance
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError("CollaborativeOptimization: `log_dir` must be a path or None. "
                             f"Received: log_dir={log_dir!r}")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._runner = None
        self._guard = None

    @property
    def phase_label(self):
        """The label of the phase training now (None before the first)."""
        return None if self._runner is None else self._runner.label

    def on_train_begin(self, logs=None):
        eng = get_engine(self.model, compiled=True)
        if not eng.supports_drop_in:
            eng.switch_phase(self.model, self.plan.phases[0], 1, (), {})  # says why, raises
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if epochs != self.plan.total_epochs:
            raise ValueError(
                f"CollaborativeOptimization: the phases add up to {self.plan.total_epochs} "
                f"epoch(s) ({', '.join(f'{p.label} {p.epochs}' for p in self.plan)}), but fit "
                f"runs epochs={epochs}. Expected them to match, so that every phase runs "
                f"whole. Call model.fit(..., epochs={self.plan.total_epochs}) or change the "
                "phases' epochs.")
        if not steps:
            raise ValueError(
                "CollaborativeOptimization: fit does not know its steps per epoch, which the "
                "pruning schedule is laid out on. Expected a finite dataset or arrays; give "
                "fit(steps_per_epoch=...) for a repeated dataset.")
        # The user's best-only ModelCheckpoint / restore_best_weights beside this callback:
        # each compression phase starts their best again (as collaborative_fit does).
        runner = PhaseRunner(self.plan, eng, int(steps), eng.compile_config(self.model),
                             self.rate_policy, self._probe, self.guard_mode, self.tolerance,
                             self.log_dir, sibling_callbacks(self))
        self.skipped = runner.preflight(self.model)
        runner.check_schedules()
        for planned in self.plan.phases:
            if planned.phase.kind == "train" and (planned.phase.learning_rate is not None
                                                  or planned.phase.decay is not None):
                raise ValueError(
                    "CollaborativeOptimization: a Train phase trains with your compiled "
                    "optimizer as it is (no phase switch), so its learning_rate/decay would "
                    f"be ignored. Expected Train(epochs=...) alone. Received: {planned.phase!r}."
                    " Compile the model with the rate you want for it, or use "
                    "collaborative_fit, which compiles a fresh optimizer per phase.")
        self._runner, self._started = runner, False
        if self.log_dir is not None:
            dashboard.plan(self.log_dir, self.plan)
        if self.distill is not None:
            teacher = distill_mod.make_teacher(eng, self.model, self.distill)
            self._distill_callbacks = eng.distillation(self.model, teacher, self.distill)
            self.model.make_train_function(force=True)  # fit made it before this call

    def on_epoch_begin(self, epoch, logs=None):
        for cb in self._distill_callbacks:
            cb.on_epoch_begin(epoch, logs)
        if not self._started:
            self._started = True
            if epoch > 0 and self._resume_at(epoch):
                return
        runner = self._runner
        planned = runner.starting_at(epoch)
        if planned is None:
            return
        if planned.phase.kind == "train":
            runner.begin(planned)  # trains with the compiled optimizer as it is
            return
        eng, model, offset = runner.engine, self.model, planned.start_epoch * runner.steps

        def apply(held):
            return model, [], eng.switch_phase(model, planned, runner.steps, held, runner.cfg,
                                               None, step_offset=offset)

        def compile_at(model, rate):
            eng.switch_optimizer(model, runner.cfg, rate, offset)
        entry = runner.enter(planned, apply, compile_at)
        log.info("CollaborativeOptimization: epoch %d, %s on %d layer(s), learning rate %s",
                 epoch, planned.label, len(entry.touched), entry.rate)
        self._guard = runner.guard(planned, entry.touched, entry.held)
        self._start_guard()

    def _resume_at(self, epoch) -> bool:
        """A fit that starts at `epoch` > 0 (`initial_epoch`, or `BackupAndRestore`): the model
        must carry what the plan made before that epoch (the same model object, after an
        interrupted fit). Verified from the layers' compression; then the plan goes on from
        there (True when `epoch` is inside a phase, which is then already applied). A model
        that does not carry it is refused before the first step, its weights untouched."""
        runner = self._runner
        done, current = runner.phase_at(epoch - 1), runner.phase_at(epoch)
        eng = runner.engine
        found = eng.expectations(self.model)
        carries = {"train": True,
                   "prune": any(e.get("wrapper") == "prune" for e in found.values()),
                   "cluster": any(e.get("wrapper") == "cluster" for e in found.values()),
                   "quantize": eng.is_qat(self.model)}[done.phase.kind]
        if not carries:
            raise ValueError(
                f"CollaborativeOptimization: fit starts at epoch {epoch} (initial_epoch, or "
                f"BackupAndRestore), after the plan's {done.label} (epochs {done.start_epoch}-"
                f"{done.end_epoch - 1}), but model '{self.model.name}' carries no "
                f"{done.phase.kind} compression: the phases before epoch {epoch} were never "
                "applied to it, and starting there would skip them. Expected the same model "
                "object an interrupted fit left (its layers keep their masks, centroids and "
                "ranges), or fit from epoch 0. To resume across processes, use "
                "collaborative_fit(..., checkpoint_dir=...). Nothing was trained.")
        runner.carried_by(found)
        log.info("CollaborativeOptimization: fit starts at epoch %d, after %s; the model "
                 "carries its compression (%d pruned, %d clustered layer(s)).", epoch,
                 done.label, len(runner.pruned), len(runner.clustered))
        if current is None or current.start_epoch == epoch:
            return False  # the next phase is switched to as usual
        runner.begin(current)
        touched = {"prune": runner.pruned, "cluster": runner.clustered,
                   "quantize": sorted(found), "train": []}[current.phase.kind]
        self._guard = runner.guard(current, touched, [])
        self._start_guard()
        return True

    def _start_guard(self) -> None:
        if self._guard is not None:
            self._guard.set_model(self.model)
            self._guard.on_train_begin()

    def on_epoch_end(self, epoch, logs=None):
        if self._guard is not None:
            self._guard.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._runner is not None:  # get_weights() shows the zeros and shared values
            self._runner.engine.settle(self.model)
        if self._distill_callbacks:  # the user's model trains as compiled in a later fit
            distill_mod.remove(self.model)
            self._distill_callbacks = []
        if self.log_dir is not None:
            dashboard.close(self.log_dir)
