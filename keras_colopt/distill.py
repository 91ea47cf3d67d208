"""Distillation from the float model: a soft-target loss added to every phase's training.

`collaborative_fit(..., distill=True)` distils from a frozen copy of the model as given;
`distill=Distill(teacher=..., temperature=..., weight=...)` gives control. Each training
step minimizes

    (1 - weight) * loss(y, student(x))  +  weight * T^2 * KL(softmax(t / T) || softmax(s / T))

with `t`, `s` the teacher's and the student's logits (log-probabilities when the model
outputs probabilities, i.e. its loss is not `from_logits`) and `T` the temperature. With
`y=None` (unlabelled data) only the soft term is minimized: the teacher labels the data.
Epoch logs: `loss` is the labels' loss as without distillation (comparable with `val_loss`;
the soft loss when there are no labels), `distill_loss` the soft-target term; without labels
the training metrics (e.g. `accuracy`) compare with the teacher's predictions (agreement).
Validation is unchanged (the labels' loss and metrics).

Keras 3.15's `keras.distillation.Distiller` is not used for the Keras 3 engine (read on
3.15.1): it is a third model wrapping teacher and student, so the drop-in
`CollaborativeOptimization` (which trains the user's own model object inside the user's
`fit`) could not use it, and the user's callbacks and checkpoints would see the wrapper, not
their model; its `LogitsDistillation` divides the outputs by `T` and applies softmax, which is
wrong for a model that outputs probabilities; and its `compute_loss` leaves `sample_weight`
unused, so `class_weight` would be dropped without a word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import types
from typing import Optional

import tensorflow as tf

from keras_colopt.engines.base import Callback

# Chosen by measurement (benchmarks/distill_sweep.py, results/distill_sweep.md): of T in
# {2, 4, 8} x weight in {0.5, 0.9}, T=2 with weight 0.5 had the best int8 accuracy and
# agreement with the float model on both pairs measured (the demo CNN, DS-CNN).
DEFAULT_TEMPERATURE = 2.0
DEFAULT_WEIGHT = 0.5

log = logging.getLogger("keras_colopt")


@dataclasses.dataclass
class Distill:
    """How to distil during `collaborative_fit` (every phase, Train included).

    Args:
        teacher: the model to distil from, or `None` for a frozen copy of the model given to
            `collaborative_fit` (before any phase). Its output must have the student's shape.
        temperature: softens both distributions; `> 0`. Defaults to 2.
        weight: the soft-target term's share of the loss, in `(0, 1]`; with `y=None` it is
            1 whatever is given. Defaults to 0.5.
    """

    teacher: object = None
    temperature: float = DEFAULT_TEMPERATURE
    weight: float = DEFAULT_WEIGHT

    def __post_init__(self):
        for name, low, high, closed in (("temperature", 0.0, math.inf, False),
                                        ("weight", 0.0, 1.0, True)):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) \
                and low < v and (v <= high if closed else v < high)
            if not ok:
                raise ValueError(
                    f"Distill: `{name}` must be a number in "
                    f"{'(0, 1]' if closed else '(0, inf)'}. Expected e.g. "
                    f"Distill({name}={DEFAULT_TEMPERATURE if name == 'temperature' else DEFAULT_WEIGHT}). "
                    f"Received: {name}={v!r}")

    def get_config(self) -> dict:
        return {"teacher": None if self.teacher is None else getattr(self.teacher, "name", "?"),
                "temperature": float(self.temperature), "weight": float(self.weight)}


def resolve(distill) -> Optional[Distill]:
    """`distill=` as given to collaborative_fit: None/False, True, or a `Distill`."""
    if distill is None or distill is False:
        return None
    if distill is True:
        return Distill()
    if isinstance(distill, Distill):
        return distill
    raise ValueError("`distill` must be True, False, None or a keras_colopt.Distill. Expected "
                     "e.g. distill=True, or distill=colopt.Distill(temperature=4, weight=0.5). "
                     f"Received: distill={distill!r}")


def frozen_copy(engine, model, scope=contextlib.nullcontext):
    """A copy of `model` (made in `scope`) that does not train: the default teacher."""
    with scope():
        teacher = engine.clone_model(model)
    teacher.trainable = False
    return teacher


def make_teacher(engine, model, settings: Distill, scope=contextlib.nullcontext):
    """The model distilled from: the user's teacher, checked against the student `model`, or
    a frozen copy of `model` as it is now (made in `scope`, e.g. a strategy's). Raises a
    clear error for a teacher that cannot teach this student."""
    engine.check_distill(model)
    teacher = settings.teacher
    if teacher is None:
        teacher = frozen_copy(engine, model, scope)
        source = f"a frozen copy of '{model.name}' as given"
    else:
        if not engine.accepts(teacher):
            raise ValueError(
                f"Distill: the teacher {teacher!r} is not a model of the student's Keras "
                f"({engine.name} engine, model '{model.name}'). Expected a built model of the "
                "same Keras, with the student's output shape. Build the teacher with the "
                "same Keras, or pass distill=True to distil from a copy of the student.")
        source = f"the teacher '{teacher.name}'"
    t_shape = [tuple(t.shape)[1:] for t in teacher.outputs]
    s_shape = [tuple(s.shape)[1:] for s in model.outputs]
    if len(s_shape) != 1 or t_shape != s_shape:
        raise ValueError(
            f"Distill: the teacher's outputs {t_shape} do not match the student's {s_shape} "
            f"(model '{model.name}'). Expected a teacher with one output of the student's "
            "shape (the same classes, as logits or probabilities like the student); "
            "multi-output models are not distilled yet.")
    log.info("Distilling from %s: temperature %g, weight %g (the epoch logs' distill_loss is "
             "the soft-target loss; loss is the labels' loss)", source, settings.temperature,
             settings.weight)
    return teacher


def install(model, train_step, tracker) -> list:
    """Makes `train_step(self, data)` the step of `model` (an engine's distilling step, which
    logs `tracker` as distill_loss); returns the callback that resets `tracker` every epoch."""
    model.train_step = types.MethodType(train_step, model)
    model.train_function = None
    return [_ResetAtEpochBegin(tracker)]


class _ResetAtEpochBegin(Callback):
    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def on_epoch_begin(self, epoch, logs=None):
        self.tracker.reset_state()


def remove(model) -> None:
    """Gives `model` back its own train step (after the run: a later `fit` of the returned
    model trains as the user compiled it, without the teacher)."""
    if model is not None and "train_step" in vars(model):
        del model.train_step
        model.train_function = None


def from_logits(loss) -> bool:
    """Whether a compiled loss reads logits (`from_logits=True`); strings and plain functions
    read probabilities, as Keras' own defaults do."""
    get_config = getattr(loss, "get_config", None)
    if callable(get_config):
        try:
            return bool(get_config().get("from_logits", False))
        except (TypeError, NotImplementedError):
            return False
    return False


def sparse_labels(loss) -> bool:
    """Whether a compiled loss takes class indices (sparse categorical crossentropy)."""
    name = loss if isinstance(loss, str) else getattr(loss, "name", None) or getattr(
        loss, "__name__", "") or type(loss).__name__
    return "sparse" in str(name).lower()


def teacher_labels(teacher_out, logits: bool, sparse: bool):
    """The teacher's predictions as labels in the student's format (class indices, or
    probabilities): what the training metrics compare with when the data has no labels."""
    probs = tf.nn.softmax(teacher_out, axis=-1) if logits else teacher_out
    return tf.argmax(probs, axis=-1) if sparse else probs


def soft_loss(teacher_out, student_out, temperature: float, logits: bool):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (per replica: the caller
    scales it for distribution as Keras scales its own losses)."""
    t = tf.cast(teacher_out, tf.float32)
    s = tf.cast(student_out, tf.float32)
    if not logits:  # probabilities: their logs are logits up to a constant per sample
        t = tf.math.log(tf.clip_by_value(t, 1e-7, 1.0))
        s = tf.math.log(tf.clip_by_value(s, 1e-7, 1.0))
    log_pt = tf.nn.log_softmax(tf.stop_gradient(t) / temperature, axis=-1)
    log_ps = tf.nn.log_softmax(s / temperature, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return temperature ** 2 * tf.reduce_mean(kl)


def mixed_loss(model, y, y_pred, target, temperature: float, weight: float, logits: bool,
               labels_loss):
    """(what a distilled step minimizes, the soft loss, the labels' loss or None without
    labels). `labels_loss()` is the model's own loss as Keras computes it in a step (scaled
    for distribution, with the regularization losses)."""
    soft = soft_loss(target, y_pred, temperature, logits)
    if y is None:
        extra = tf.add_n(model.losses) if model.losses else 0.0
        return per_replica(soft + extra), soft, None
    hard = labels_loss()
    return (1 - weight) * hard + weight * per_replica(soft), soft, hard


def per_replica(loss):
    """`loss` divided by the replicas in sync, as Keras scales each replica's loss so that
    their gradients sum to the global batch's."""
    n = tf.distribute.get_strategy().num_replicas_in_sync
    return loss / n if n > 1 else loss
