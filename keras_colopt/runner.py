"""The phase runner: the plan's bookkeeping, shared by both ways of running it.

`collaborative_fit` runs one `fit()` per phase on a re-wrapped model; the drop-in
`CollaborativeOptimization` switches phases in place inside the user's one `fit()`. Both
go through one `PhaseRunner`: it knows where the plan stands at any epoch, which layers
each phase touched and which earlier work it holds fixed, chooses each phase's learning
rate (`keras_colopt.finetune`) and says why, builds the phase's `InvariantGuard` from the
plan's expectations, refuses a Quantize phase that would lose the clusters, and resets the
user's best-value callbacks at every phase switch. How a phase is applied (a new wrapped
model, or the same model switched in place) is the caller's, passed as two functions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Sequence

from keras_colopt import expectations, finetune
from keras_colopt.plan import Plan, PlannedPhase

log = logging.getLogger("keras_colopt")


@dataclasses.dataclass
class PhaseEntry:
    """A phase as entered: the model it trains, the layers it touches, the layers it holds
    fixed (earlier work it does not touch), its companion callbacks and its rate."""

    model: object
    touched: List[str]
    held: List[str]
    companions: list
    rate: finetune.PhaseRate


class PhaseRunner:
    """Where a plan stands, and what entering each of its phases takes.

    Args:
        plan: the resolved `Plan`.
        engine: the model's engine.
        steps: training steps per epoch (the pruning schedule is laid out on them).
        compile_cfg: the engine's `compile_config` of the user's model.
        policy: the fine-tuning rate policy (`finetune.resolve_policy`).
        probe: the rate probe's `finetune.ProbeData`, or why there is none (a str).
        guard: True, "warn" or False: the `InvariantGuard` each phase gets.
        tolerance: the guard's sparsity tolerance.
        log_dir: the run's log directory (the guard writes the dashboard's checks there).
        callbacks: the user's callbacks whose best values each phase starts again.
    """

    def __init__(self, plan: Plan, engine, steps: int, compile_cfg: dict, policy, probe,
                 guard=True, tolerance: float = 0.005, log_dir=None, callbacks=()):
        self.plan, self.engine, self.steps, self.cfg = plan, engine, steps, compile_cfg
        self.policy, self.probe = policy, probe
        self.guard_mode, self.tolerance, self.log_dir = guard, tolerance, log_dir
        self.bests = BestValueReset(callbacks)
        self.pruned: List[str] = []
        self.clustered: List[str] = []
        self.label: Optional[str] = None  # the phase training now

    @property
    def compiled_rate(self):
        return self.cfg["optimizer_config"].get("learning_rate")

    def check_schedules(self) -> None:
        """Raises, before training, for a phase whose rate cannot be built (a cosine with a
        compiled schedule and no `learning_rate` to start from)."""
        for planned in self.plan.phases:
            planned.phase.schedule_for(self.compiled_rate, self.steps)

    def preflight(self, model) -> dict:
        """`{phase label: [layers it cannot touch]}`, each named in a warning, as is a
        Quantize phase that lets the pruned zeros go."""
        skipped = self.engine.preflight(model, self.plan)
        for label, names in skipped.items():
            if names:
                log.warning("%s cannot touch %d layer(s) with weights; they stay as they are: "
                            "%s", label, len(names), ", ".join(names))
        for p in self.plan:
            if p.phase.kind == "quantize" and not p.preserve_sparsity and any(
                    q.phase.kind == "prune" for q in self.plan.phases[:p.index]):
                log.warning("%s does not preserve sparsity (preserve=%r): the pruned zeros "
                            "will not survive quantization-aware training.", p.label,
                            p.phase.preserve)
        return skipped

    # ------------------------------------------------------------------ position
    def phase_at(self, epoch: int) -> Optional[PlannedPhase]:
        """The phase that trains epoch `epoch` (None past the plan's end)."""
        return next((p for p in self.plan.phases if p.start_epoch <= epoch < p.end_epoch),
                    None)

    def starting_at(self, epoch: int) -> Optional[PlannedPhase]:
        """The phase whose first epoch is `epoch`, or None."""
        return next((p for p in self.plan.phases if p.start_epoch == epoch), None)

    def applied_before(self, model, index: int) -> None:
        """The layers the phases before `index` touched, selected again on `model` (one that
        carries their work, unwrapped: `initial_phase`, or a checkpoint's resume)."""
        for planned in self.plan.phases[:index]:
            if planned.phase.kind == "prune":
                self.pruned = self.engine.select_layers(model, planned.phase, "prune")[0]
            elif planned.phase.kind == "cluster":
                self.clustered = self.engine.select_layers(model, planned.phase, "cluster")[0]

    def carried_by(self, found: dict) -> None:
        """The layers a model's own compression (`found`: the engine's `expectations` of a
        model an interrupted `fit` left, switched in place) says were pruned and clustered."""
        self.pruned = sorted(n for n, e in found.items() if e.get("sparsity") is not None)
        self.clustered = sorted(n for n, e in found.items() if e.get("clusters") is not None)

    # ------------------------------------------------------------------ phases
    def begin(self, planned: PlannedPhase) -> None:
        """Marks `planned` as the phase training now without entering it: a Train phase of
        the drop-in (the compiled optimizer trains it as it is), or the phase a resumed fit
        starts inside (it was entered before the interruption)."""
        self.label = planned.label

    def enter(self, planned: PlannedPhase, apply, compile_at, saved_rate=None,
              resumed: bool = False) -> PhaseEntry:
        """Enters one phase.

        Args:
            planned: the phase.
            apply: `apply(held) -> (model, companions, touched)`: applies the phase with the
                `held` layers frozen.
            compile_at: `compile_at(model, rate)` gives the phase's model a fresh optimizer
                like the compiled one at `rate` (a number, a schedule; the probe calls it
                too).
            saved_rate: the rate this phase chose before a resume (kept: a resumed phase
                trains at the rate it started with).
            resumed: the phase is entered again after a resume (no frozen-layers line).
        """
        if self.label is not None:  # a phase ran before this one in this run
            self.bests.reset(planned.label)
        self.label = planned.label
        held = expectations.held_layers(planned, self.pruned, self.clustered)
        model, companions, touched = apply(held)
        rate = self._rate(planned, model, companions, lambda r: compile_at(model, r),
                          saved_rate)
        compile_at(model, rate.schedule)
        self._check_clusters_kept(planned, model, touched)
        held = sorted(set(held) - set(touched))
        if held and not resumed:
            log.info("%s does not touch layer(s) %s, which carry the work of an earlier "
                     "phase (zeros or clusters): they are frozen during it, so that it keeps "
                     "their compression.", planned.label, ", ".join(held))
        if planned.phase.kind == "prune":
            self.pruned = list(touched)
        elif planned.phase.kind == "cluster":
            self.clustered = list(touched)
        return PhaseEntry(model, list(touched), held, list(companions), rate)

    def guard(self, planned: PlannedPhase, touched: Sequence[str], held: Sequence[str],
              kernels_from=None):
        """The phase's `InvariantGuard` (None: no guard asked for, or nothing to check)."""
        if not self.guard_mode:
            return None
        return expectations.guard(self.plan, planned, touched, held, self.pruned,
                                  self.clustered, self.guard_mode, self.tolerance,
                                  self.log_dir, kernels_from)

    def _rate(self, planned, model, companions, compile_at, saved_rate) -> finetune.PhaseRate:
        compiled = self.compiled_rate
        if saved_rate is not None and planned.phase.learning_rate is None:
            choice = finetune.RateChoice(saved_rate, "as chosen before the resume")
        else:
            with self.engine.quiet_expected_warnings(model):
                choice = finetune.choose(self.policy, planned.phase, compiled, self.probe,
                                         compile_at, model, companions)
        return finetune.phase_schedule(planned.phase, choice, compiled, self.steps)

    def _check_clusters_kept(self, planned, model, touched) -> None:
        if not (planned.phase.kind == "quantize" and planned.preserve_clusters):
            return
        lost = self.engine.unpreserved_clusters(model, set(self.clustered) & set(touched))
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


class BestValueReset:
    """The best-value state of the user's callbacks (a `ModelCheckpoint(save_best_only=True)`,
    `EarlyStopping`, `ReduceLROnPlateau`: their `best`, `best_weights`, `wait`), put back as it
    was when the run began at each phase switch. A best carried over from an uncompressed
    phase would keep the file of that phase (and `restore_best_weights` its weights): every
    phase starts its own best, so the file left and the weights restored are the best of the
    phase, holding its invariants. Used by `collaborative_fit` (the callbacks given to it) and
    by `CollaborativeOptimization` (the callbacks beside it in the same `fit`)."""

    _ATTRS = ("best", "best_weights", "best_epoch", "wait")

    def __init__(self, callbacks):
        self.saved = [(cb, {a: getattr(cb, a) for a in self._ATTRS if hasattr(cb, a)})
                      for cb in callbacks if hasattr(cb, "best")]

    def reset(self, label) -> None:
        for cb, values in self.saved:
            for attr, value in values.items():
                setattr(cb, attr, value)
            log.info("%s: %s starts its own best %s (the best of each phase is kept).", label,
                     type(cb).__name__, getattr(cb, "monitor", "value"))


def sibling_callbacks(callback) -> list:
    """The other callbacks of the `fit` that is calling `callback` now (from `on_train_begin`):
    a callback holds no reference to its CallbackList, so it is found up the call stack (the
    frame of the CallbackList method that is calling it, whose public `callbacks` list holds
    `callback`). Empty when none is found."""
    import inspect

    frame = inspect.currentframe()
    try:
        f = frame.f_back
        while f is not None:
            found = getattr(f.f_locals.get("self"), "callbacks", None)
            if isinstance(found, list) and any(c is callback for c in found):
                return [c for c in found if c is not callback]
            f = f.f_back
    finally:
        del frame
    return []
