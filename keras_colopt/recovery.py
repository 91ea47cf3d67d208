"""What a run keeps so that no failure loses the user's work.

The last good state (the model and history at the last epoch that passed every check, or
the model a phase started from), the epoch record that keeps it and the checkpoint, the
finite-loss check that ends a diverged phase before anything saves it, and the hand-back
that gives an error raised after some training that last good model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

from keras_colopt.engines.base import Callback


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the phase was stopped."""


class FiniteLoss(Callback):
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
            raise TrainingDiverged(diverged_message(self.planned, (epoch, float(loss)),
                                                     self.ckpt))


def diverged_message(planned, bad, ckpt) -> str:
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


@dataclasses.dataclass
class LastGood:
    """The run's last good state: the history up to it, and either the training model and
    its weights at an epoch end, or a snapshot of the model a phase started from."""

    history: Dict[str, list]
    epochs: List[int]
    labels: List[str]
    model: object = None
    weights: Optional[list] = None
    snapshot: object = None


class EpochRecord(Callback):
    """At every epoch end, after every other callback (an epoch that the guard or the
    finite-loss check refused never gets here): records the epoch, keeps its weights as the
    run's last good state, and checkpoints it."""

    def __init__(self, run, planned):
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
        merged, seen, labels = history_with(*self.prior, self.logs, self.ran, self.planned.label)
        self.run.last_good = LastGood(merged, seen, labels, model=self.model,
                                      weights=self.model.get_weights())
        if self.run.ckpt is not None:
            self.run.ckpt.save(self.model, self.planned.index, epoch + 1, merged, seen, labels)


def hand_back(run, error: BaseException, phase: Optional[str], result: Callable) -> None:
    """Gives an error raised after some training the run's last good state.

    Sets on `error`: `result`, a `FitResult` whose model is the last good one and whose
    history ends there: the training model restored to the weights of its last epoch that
    passed every check, or, for an error before the phase's first epoch ended, a new copy
    of the model the phase started from (unwrapped: export it, or continue from it with
    `initial_phase=`); `model`, the same model, unless the error carries one already
    (`InvariantViolation`: then its weights when the violation was found are kept in
    `error.model_at_error_weights`); `checkpoint_dir`, the folder holding the last good
    checkpoint, or None; and a note saying where they are. `phase`: the label of the phase
    the error ended; `result(model)` makes the `FitResult` from the run's state, its history
    cut back to the last good epoch.
    """
    where = run.ckpt.folder if run.ckpt is not None and run.ckpt.manifest is not None else None
    error.checkpoint_dir = where
    good = run.last_good
    if good is None:
        if where is not None:
            note(error, f"collaborative_fit: the last good checkpoint is in {where}; rerun the "
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
        note(error, f"collaborative_fit: the last good model could not be handed back "
                     f"({type(e).__name__}: {e}).")
        return
    run.history, run.epochs, run.labels = good.history, good.epochs, good.labels
    error.result = result(model)
    if getattr(error, "model", None) is None:
        error.model = model
    note(error, f"collaborative_fit: {type(error).__name__} during {phase}, after "
                 f"{len(good.epochs)} epoch(s) of training. The last good model (after epoch "
                 f"{good.epochs[-1]}, {good.labels[-1]}) is handed back: error.result.model, "
                 "with its history in error.result.history"
                 + (f"; the last good checkpoint is in {where} (rerun the same call to resume)."
                    if where else "."))


def note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:  # Python 3.10: no notes; the attributes are still set
        error.__dict__.setdefault("__notes__", []).append(text)


def history_with(merged, epochs_seen, labels, new: Dict[str, list], ran: List[int], label: str):
    """The run's history so far with one `fit()`'s history appended (new copies): a key
    that appears or disappears between phases is padded with NaN."""
    out = {k: list(v) for k, v in merged.items()}
    for key in set(out) | set(new):
        out.setdefault(key, [float("nan")] * len(epochs_seen))
        out[key] += [float(v) for v in new.get(key, [float("nan")] * len(ran))]
    return out, list(epochs_seen) + list(ran), list(labels) + [label] * len(ran)
