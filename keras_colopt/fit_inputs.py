"""The arguments of `collaborative_fit`, checked before any training: the fit arguments it
manages or does not know, the user's callbacks and log directory, and how many steps an
epoch of the given data has (the pruning schedule is laid out on them)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys

import numpy as np
import tensorflow as tf

from keras_colopt.engines import engine_of
from keras_colopt.plan import Plan

log = logging.getLogger("keras_colopt")

_MANAGED = {
    "epochs": "the epochs come from the phases: give each phase its `epochs`",
    "initial_epoch": "the epoch axis is managed across phases",
    "x": "pass x positionally", "y": "pass y positionally",
}


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


def check_inputs(engine, callbacks, fit_kwargs, log_dir):
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


def check_labels(model, x, y, distilling: bool) -> None:
    if y is None and not distilling and is_arrays(x):
        raise ValueError(
            f"`y` is None, and `x` holds arrays of inputs only: model '{model.name}' has no "
            "labels to train on. Expected labels `y`, or `distill=True` to compress with "
            "unlabelled data (a frozen copy of the model labels it). Received: y=None")


def check_flags(invariant_guard, compression_metrics) -> None:
    if invariant_guard not in (True, False, "warn"):
        raise ValueError("`invariant_guard` must be True, False or 'warn'. "
                         f"Received: invariant_guard={invariant_guard!r}")
    if not isinstance(compression_metrics, bool):
        raise ValueError("`compression_metrics` must be a bool. "
                         f"Received: compression_metrics={compression_metrics!r}")


def is_arrays(x) -> bool:
    """Whether `x` is in-memory inputs (an array, or a list/dict of them), which cannot carry
    labels, unlike a dataset or a generator."""
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(v, (np.ndarray, tf.Tensor)) for v in x)
    return isinstance(x, (np.ndarray, tf.Tensor))


@contextlib.contextmanager
def visible_log(verbose):
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


def custom_object_scope(model, custom_objects):
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


def check_initial_phase(initial_phase, plan: Plan) -> int:
    if (isinstance(initial_phase, bool) or not isinstance(initial_phase, int)
            or not 0 <= initial_phase < len(plan)):
        raise ValueError(
            "`initial_phase` must be the index of a phase to start from. Expected an int in "
            f"[0, {len(plan) - 1}] for these {len(plan)} phases. Received: "
            f"initial_phase={initial_phase!r}")
    return initial_phase


def role(strategy):
    """(is this process the chief, its name "worker-1") in a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, "chief"
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    chief = kind == "chief" or (kind == "worker" and index == 0 and not has_chief)
    return chief, f"{kind}-{index}"


def scope_of(strategy):
    if strategy is None:
        return contextlib.nullcontext
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError("`strategy` must be a tf.distribute.Strategy, e.g. "
                         "tf.distribute.MirroredStrategy(). Received: "
                         f"strategy={type(strategy).__name__}")
    return strategy.scope
