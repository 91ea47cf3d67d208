"""Drop-in callbacks: CompressionMetrics and InvariantGuard.

Both work in a plain `model.fit` (with a tfmot-wrapped model built by hand, or
an unwrapped one) and are installed by `collaborative_fit`. Both are
re-entrant: per-run state is reset in `on_train_begin`, so one instance serves
every phase of a run.
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from typing import Dict, Union

import numpy as np
import tensorflow as tf

from keras_colopt import distill as distill_mod
from keras_colopt import finetune
from keras_colopt import invariants, stats
from keras_colopt.engines import get_engine
from keras_colopt.engines.base import Callback
from keras_colopt.tensorboard import summary as dashboard

log = logging.getLogger("keras_colopt")


def effective_kernels(model, engine=None) -> Dict[str, list]:
    """`{layer name: [(weight name, array, channel axis)]}` of the kernels each layer
    really computes with (see `engines.tfmot.kernels`), for every layer that has one, at
    any depth of nested models: a layer's name is its path (`backbone/conv1`, see the
    engine's `walk`)."""
    engine = engine or get_engine(model, compiled=False)
    out = {}
    for name, layer in engine.walk(model):
        ks = engine.kernels(layer)
        if ks:
            out[name] = ks
    return out


def layer_stats(model, engine=None, kernels=None) -> Dict[str, stats.TensorStats]:
    """Per-layer compression statistics of the weights each layer computes with.

    Args:
        model: a model an engine accepts, wrapped or not.
        kernels: the output of `effective_kernels(model)`, when already computed.

    Returns:
        `{layer path name: TensorStats}` over every layer with a kernel; a layer's
        kernels are pooled, `unique` is the largest per-kernel count and
        `unique_per_channel_max` the largest per-output-channel count.
    """
    if kernels is None:
        kernels = effective_kernels(model, engine)
    return {name: _pooled(name, stats.kernel_stats(ks)) for name, ks in kernels.items()}


def _pooled(name, parts) -> stats.TensorStats:
    """One layer's statistics from its kernels' (see `layer_stats`)."""
    zeros, size = sum(p.zeros for p in parts), sum(p.size for p in parts)
    return stats.TensorStats(
        name=name, shape=parts[0].shape, sparsity=zeros / max(1, size), zeros=zeros,
        size=size, unique=max(p.unique for p in parts),
        unique_per_channel_max=max((p.unique_per_channel_max or 0) for p in parts) or None)


class CompressionMetrics(Callback):
    """Logs per-layer sparsity and unique weight counts every epoch.

    Statistics are computed on the weights each layer really computes with
    (masked, re-clustered, fake-quantized), not on raw variables. Per-layer
    scalars go to TensorBoard under `sparsity/<layer>`,
    `unique_weights/<layer>` and `unique_weights_per_channel/<layer>`, with
    kernel histograms under `weights/<layer>`, in `<log_dir>/compression`.
    Layer names are the user's (unwrapped) names, so a series runs on across
    phases; a layer inside a nested model (a backbone) is named by its path,
    `sparsity/backbone/conv1`. The keras_colopt dashboard's per-epoch table
    (every layer in model order) goes to `<log_dir>/colopt` (see
    `keras_colopt.tensorboard`). Only model-wide aggregates go into `logs`:
    `compression/sparsity` (zeros over all kernel weights) and
    `compression/max_unique_weights`.

    Args:
        log_dir: TensorBoard log directory, or `None` for `logs` only.
            Defaults to `None`.
        histograms: also write kernel histograms. Defaults to `True`.

    Example:
        >>> cb = CompressionMetrics(log_dir="logs/run1")
        >>> # model.fit(x, y, callbacks=[cb]); cb.layer_stats["dense"].sparsity
    """

    def __init__(self, log_dir=None, histograms=True):
        super().__init__()
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError("CompressionMetrics: `log_dir` must be a path or None. Expected a "
                             "directory for TensorBoard event files. "
                             f"Received: log_dir={log_dir!r}")
        if not isinstance(histograms, bool):
            raise ValueError("CompressionMetrics: `histograms` must be a bool. "
                             f"Received: histograms={histograms!r}")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.histograms = histograms
        self.layer_stats: Dict[str, stats.TensorStats] = {}
        self._writer = None
        self._engine = None
        self._epoch_kernels = None  # (epoch, effective kernels, their per-kernel stats)

    def get_config(self):
        return {"log_dir": self.log_dir, "histograms": self.histograms}

    def on_train_begin(self, logs=None):
        self._engine = get_engine(self.model, compiled=False)
        self.layer_stats = {}
        self._epoch_kernels = None
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "compression"))

    def on_epoch_end(self, epoch, logs=None):
        kernels = effective_kernels(self.model, self._engine)
        parts = {name: stats.kernel_stats(ks) for name, ks in kernels.items()}
        self.layer_stats = {name: _pooled(name, p) for name, p in parts.items()}
        self._epoch_kernels = (epoch, kernels, parts)
        agg = stats.summarize(self.layer_stats.values())
        if logs is not None:
            logs["compression/sparsity"] = agg["sparsity"]
            logs["compression/max_unique_weights"] = agg["max_unique"]
        if self._writer is None:
            return
        per_channel = {n for n, e in self._engine.expectations(self.model).items()
                       if e.get("per_channel")}
        with self._writer.as_default(step=epoch):
            for name, s in self.layer_stats.items():
                tf.summary.scalar(f"sparsity/{name}", s.sparsity)
                tf.summary.scalar(f"unique_weights/{name}", s.unique)
                if name in per_channel and s.unique_per_channel_max is not None:
                    tf.summary.scalar(f"unique_weights_per_channel/{name}",
                                      s.unique_per_channel_max)
            if self.histograms:
                for name, ks in kernels.items():
                    _histogram(f"weights/{name}",
                               np.concatenate([np.ravel(w) for _, w, _ in ks]), epoch)
        self._writer.flush()
        dashboard.epoch(self.log_dir, epoch, self.layer_stats, per_channel,
                        wrappers=self._engine.wrapper_kind(self.model))

    def on_train_end(self, logs=None):
        self._epoch_kernels = None  # a guard in a later fit must not take them as its own
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            dashboard.close(self.log_dir)


def _histogram(tag, values, step, bins=30):
    """A TensorBoard histogram computed in numpy (tf.summary.histogram's eager ops cost
    ~5 ms per call, the bulk of this callback's time)."""
    from tensorboard.plugins.histogram import metadata

    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    tensor = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    tf.summary.write(tag, tensor, step=step,
                     metadata=metadata.create_summary_metadata(display_name=None,
                                                               description=None))


Number = Union[int, float]


def _check_target(arg, value, ok, expected):
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for k, v in items:
        if k is not None and not isinstance(k, str):
            raise ValueError(f"InvariantGuard: `{arg}` keys must be layer names. "
                             f"Received: {arg}={value!r}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(v):
            raise ValueError(f"InvariantGuard: `{arg}` must be {expected}, or a dict of layer "
                             f"name -> such a value, or None to read it from the model's "
                             f"wrappers. Received: {arg}={value!r}")
    return dict(value) if isinstance(value, dict) else value


class InvariantGuard(Callback):
    """Checks at every epoch end that compression invariants hold.

    Each pruned layer must keep at least its target sparsity once its pruning
    schedule has ended; each clustered layer must have at most its number of
    clusters (per output channel when clustering, or the layer's 8-bit weight
    quantizer, is per channel). Checked on the weights the layers really
    compute with.

    A number given here applies to the layers that carry that technique: a
    `sparsity` to every layer with a pruning wrapper or a sparsity-preserving
    wrapper (clustering, PQAT, PCQAT), a `clusters` to every layer with a
    clustering wrapper or a cluster-preserving quantizer (CQAT, PCQAT), so that
    the layers a hand-written pipeline left unwrapped are not reported. A dict
    applies to the named layers, wrapped or not (a layer inside a nested model
    is named by its path, `backbone/conv1`). Expectations not given are
    read from the model's wrappers (pruning schedules, clustering wrappers,
    PQAT/CQAT/PCQAT quantizers). A number that no layer carries is named in a
    warning at the start of training: nothing would be checked for it.

    Args:
        sparsity: minimal sparsity, a dict `{layer: sparsity}`, or `None`.
            Defaults to `None`.
        clusters: maximal unique values, a dict `{layer: clusters}`, or
            `None`. Defaults to `None`.
        mode: `"raise"` (raise `InvariantViolation`, stopping training) or
            `"warn"`. Defaults to `"raise"`.
        tolerance: how far below its target a layer's sparsity may fall
            (absolute), on top of one weight of rounding. Defaults to `0.005`.
        per_channel: count clusters per output channel for every layer.
            Defaults to `False` (per channel only where the model says so).
        phase: label used in messages; defaults to what the wrappers show
            ("prune", "cluster", "PCQAT", ...).
        log_dir: the run's TensorBoard log directory (the `CompressionMetrics` one):
            every epoch, what each checked layer is expected to show and what it
            shows, with the violations, is written there for the keras_colopt
            dashboard (also in "raise" mode, before raising). Defaults to `None`.

    Example:
        >>> guard = InvariantGuard(sparsity=0.5, clusters=8)
        >>> # model.fit(x, y, callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), guard])
    """

    def __init__(self, sparsity=None, clusters=None, mode="raise", tolerance=0.005,
                 per_channel=False, phase=None, log_dir=None):
        super().__init__()
        self.sparsity = _check_target("sparsity", sparsity, lambda v: 0 <= v < 1,
                                      "a number in [0, 1)")
        self.clusters = _check_target("clusters", clusters,
                                      lambda v: v >= 1 and float(v).is_integer(),
                                      "an integer >= 1")
        if mode not in ("raise", "warn"):
            raise ValueError("InvariantGuard: `mode` must be 'raise' or 'warn'. "
                             f"Received: mode={mode!r}")
        if (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real)
                or not 0 <= tolerance < 1):
            raise ValueError("InvariantGuard: `tolerance` must be in [0, 1), e.g. 0.005. "
                             f"Received: tolerance={tolerance!r}")
        if not isinstance(per_channel, bool):
            raise ValueError("InvariantGuard: `per_channel` must be a bool. "
                             f"Received: per_channel={per_channel!r}")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError("InvariantGuard: `log_dir` must be a path or None. Expected the "
                             f"run's TensorBoard log directory. Received: log_dir={log_dir!r}")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.mode = mode
        self.tolerance = float(tolerance)
        self.per_channel = per_channel
        self.phase = phase
        self.violations = []
        self._engine = None
        # A CompressionMetrics that runs at every epoch end just before this guard, with
        # no callback between them (collaborative_fit installs them so): its kernels and
        # counts of the epoch are this guard's too, instead of being read and counted twice.
        self._kernels_from = None

    def get_config(self):
        return {"sparsity": self.sparsity, "clusters": self.clusters, "mode": self.mode,
                "tolerance": self.tolerance, "per_channel": self.per_channel,
                "phase": self.phase, "log_dir": self.log_dir}

    def on_train_begin(self, logs=None):
        self._engine = get_engine(self.model, compiled=False)
        self.violations = []
        self._checked = 0  # layer checks made during this fit
        names = {name for name, _ in self._engine.walk(self.model)}
        carried = self._engine.expectations(self.model).values()
        for arg, key, technique in (("sparsity", "sparsity", "pruning (a pruning wrapper, or "
                                     "a sparsity-preserving clustering or QAT wrapper)"),
                                    ("clusters", "clusters", "clustering (a clustering "
                                     "wrapper, or a cluster-preserving QAT wrapper)")):
            value = getattr(self, arg)
            if value is not None and not isinstance(value, dict) and not any(
                    e.get(key) is not None or (key == "sparsity" and e["wrapper"] == "prune")
                    for e in carried):
                msg = (f"InvariantGuard({arg}={value!r}): no layer of model "
                       f"'{self.model.name}' carries {technique}, so nothing is checked "
                       f"against it. To check layers as they are, name them: "
                       f"{arg}={{'layer_name': {value!r}}}.")
                log.warning("%s", msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        for arg in ("sparsity", "clusters"):
            value = getattr(self, arg)
            if isinstance(value, dict):
                missing = sorted(set(value) - names)
                if missing:
                    raise ValueError(
                        f"InvariantGuard: `{arg}` names layer(s) {missing} that model "
                        f"'{self.model.name}' does not have. Expected names from: "
                        f"{sorted(names)}. Received: {arg}={value!r}")

    def expectations(self) -> Dict[str, "invariants.Expectation"]:
        """The expectation of every checked layer, for the current model."""
        eng = self._engine or get_engine(self.model, compiled=False)
        from_wrappers = eng.expectations(self.model)
        out = {}
        for name, layer in eng.walk(self.model):
            w = from_wrappers.get(name, {})
            carries_sparsity = w.get("sparsity") is not None or w.get("wrapper") == "prune"
            sp = self._given(self.sparsity, name, carries_sparsity, w.get("sparsity"))
            cl = self._given(self.clusters, name, w.get("clusters") is not None,
                             w.get("clusters"))
            if w.get("wrapper") == "prune" and not w.get("sparsity_ready", True):
                sp = None  # the schedule is still ramping up
            if sp is None and cl is None:
                continue
            pc = self.per_channel or bool(w.get("per_channel")) or eng.quantized_per_channel(layer)
            out[name] = invariants.Expectation(sparsity=sp, clusters=None if cl is None
                                               else int(cl), per_channel=pc)
        return out

    @staticmethod
    def _given(value, name, carries: bool, default):
        """A layer's expectation: from a dict by name; a number only where the layer carries
        the technique (see the class docstring); otherwise what its wrapper says."""
        if isinstance(value, dict):
            return value.get(name, default)
        if value is not None and carries:
            return value
        return default

    def on_epoch_end(self, epoch, logs=None):
        eng = self._engine
        found = []
        exp = self.expectations()
        self._checked += len(exp)
        phase = self.phase or (eng.wrapper_kind(self.model) if exp else None)
        rows = []
        kernels_of, parts_of = self._metrics_kernels(epoch)
        for name, layer in eng.walk(self.model):
            if name in exp:
                if name in kernels_of:
                    kernels, parts = kernels_of[name], parts_of[name]
                else:
                    kernels = eng.kernels(layer)
                    parts = stats.kernel_stats(kernels)
                broken = invariants.check_layer(name, kernels, exp[name], self.tolerance,
                                                phase=phase, epoch=epoch, parts=parts)
                found += broken
                if self.log_dir is not None:
                    rows.append(_checked(name, parts, exp[name], broken))
        self.violations += found
        if logs is not None:
            logs["invariants/violations"] = len(found)
        if self.log_dir is not None:
            shown = phase if phase not in (None, "none") else None  # "none": no wrappers
            dashboard.invariants(self.log_dir, epoch, shown or "InvariantGuard", shown, rows,
                                 self.tolerance)
        if not found:
            return
        err = invariants.InvariantViolation(found, model=self.model)
        if self.mode == "raise":
            if self.log_dir is not None:
                dashboard.close(self.log_dir)  # fit ends here: no on_train_end
            raise err
        warnings.warn(str(err), RuntimeWarning, stacklevel=2)

    def on_train_end(self, logs=None):
        if self.log_dir is not None:
            dashboard.close(self.log_dir)
        if not getattr(self, "_checked", 1):
            msg = (f"InvariantGuard checked no layer of model '{self.model.name}' during this "
                   "fit: no layer carried compression that had reached its target (a pruning "
                   "schedule that has not made its final mask update yet, no wrapped layer, or "
                   "sparsity/clusters given for layers that carry neither). Nothing was "
                   "verified. Give the guard the expectations by layer (sparsity={'layer': "
                   "0.5}), or train until the schedule's target is reached.")
            log.warning("%s", msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _metrics_kernels(self, epoch):
        """`({layer: kernels}, {layer: their stats})` that `_kernels_from` read at this
        epoch's end on this model, or two empty dicts."""
        metrics = self._kernels_from
        read = None if metrics is None or metrics.model is not self.model \
            else metrics._epoch_kernels
        if read is None or read[0] != epoch:
            return {}, {}
        return read[1], read[2]


def _checked(name, parts, expectation, broken) -> dict:
    """One layer's row of the dashboard's invariants table: what is expected, what its
    kernels show (`parts`, their `stats.TensorStats`: zeros, unique values per tensor and
    the most in one output channel, pooled as `layer_stats` pools them), and the
    violations."""
    size = sum(p.size for p in parts)
    zeros = sum(p.zeros for p in parts)
    return {
        "name": name,
        "expected": {"sparsity": expectation.sparsity, "clusters": expectation.clusters,
                     "per_channel": expectation.per_channel},
        "found": {"sparsity": zeros / size if size else None, "zeros": zeros, "size": size,
                  "unique": max((p.unique for p in parts), default=None),
                  "unique_per_channel": max((p.unique_per_channel_max or p.unique
                                             for p in parts), default=None)},
        "violations": [{"invariant": v.invariant, "expected": v.expected, "found": v.found,
                        "message": v.message()} for v in broken]}


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
        from keras_colopt.plan import resolve

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
        self.phase_label = None
        self._engine = None
        self._guard = None

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
        self._engine, self._steps = eng, int(steps)
        self.skipped = eng.preflight(self.model, self.plan)
        for label, names in self.skipped.items():
            if names:
                log.warning("%s cannot touch %d layer(s) with weights; they stay as they "
                            "are: %s", label, len(names), ", ".join(names))
        self._cfg = eng.compile_config(self.model)
        from keras_colopt import fit as _fit

        _fit._check_schedules(self.plan, self._cfg["optimizer_config"].get("learning_rate"),
                              self._steps)
        for planned in self.plan.phases:
            if planned.phase.kind == "train" and (planned.phase.learning_rate is not None
                                                  or planned.phase.decay is not None):
                raise ValueError(
                    "CollaborativeOptimization: a Train phase trains with your compiled "
                    "optimizer as it is (no phase switch), so its learning_rate/decay would "
                    f"be ignored. Expected Train(epochs=...) alone. Received: {planned.phase!r}."
                    " Compile the model with the rate you want for it, or use "
                    "collaborative_fit, which compiles a fresh optimizer per phase.")
        self._pruned, self._clustered = [], []
        self._started = False
        # The user's best-only ModelCheckpoint / restore_best_weights beside this callback:
        # each compression phase starts their best again (as collaborative_fit does).
        self._bests = BestValueReset(sibling_callbacks(self))
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
        planned = next((p for p in self.plan.phases if p.start_epoch == epoch), None)
        if planned is None:
            return
        from keras_colopt import fit as _fit

        self.phase_label = planned.label
        if planned.index > 0:
            self._bests.reset(planned.label)
        if planned.phase.kind == "train":
            return
        compiled = self._cfg["optimizer_config"].get("learning_rate")
        held = _fit._held_layers(planned, self._pruned, self._clustered)
        offset = planned.start_epoch * self._steps
        touched = self._engine.switch_phase(self.model, planned, self._steps, held, self._cfg,
                                            None, step_offset=offset)

        def compile_at(rate):
            self._engine.switch_optimizer(self.model, self._cfg, rate, offset)
        choice = finetune.choose(self.rate_policy, planned.phase, compiled, self._probe,
                                 compile_at, self.model)
        rate = finetune.phase_schedule(planned.phase, choice, compiled, self._steps)
        self._engine.switch_optimizer(self.model, self._cfg, rate.schedule, offset)
        log.info("CollaborativeOptimization: epoch %d, %s on %d layer(s), learning rate %s",
                 epoch, planned.label, len(touched), rate)
        held = sorted(set(held) - set(touched))
        if planned.phase.kind == "prune":
            self._pruned = list(touched)
        elif planned.phase.kind == "cluster":
            self._clustered = list(touched)
        self._install_guard(planned, touched, held)

    def _resume_at(self, epoch) -> bool:
        """A fit that starts at `epoch` > 0 (`initial_epoch`, or `BackupAndRestore`): the model
        must carry what the plan made before that epoch (the same model object, after an
        interrupted fit). Verified from the layers' compression; then the plan goes on from
        there (True when `epoch` is inside a phase, which is then already applied). A model
        that does not carry it is refused before the first step, its weights untouched."""
        done = next(p for p in self.plan.phases if p.start_epoch <= epoch - 1 < p.end_epoch)
        current = next((p for p in self.plan.phases if p.start_epoch <= epoch < p.end_epoch),
                       None)
        eng = self._engine
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
        self._pruned = sorted(n for n, e in found.items() if e.get("sparsity") is not None)
        self._clustered = sorted(n for n, e in found.items() if e.get("clusters") is not None)
        log.info("CollaborativeOptimization: fit starts at epoch %d, after %s; the model "
                 "carries its compression (%d pruned, %d clustered layer(s)).", epoch,
                 done.label, len(self._pruned), len(self._clustered))
        if current is None or current.start_epoch == epoch:
            return False  # the next phase is switched to as usual
        self.phase_label = current.label
        kind = current.phase.kind
        touched = {"prune": self._pruned, "cluster": self._clustered,
                   "quantize": sorted(found), "train": []}[kind]
        self._install_guard(current, touched, [])
        return True

    def _install_guard(self, planned, touched, held) -> None:
        from keras_colopt import fit as _fit

        self._guard = None
        if self.guard_mode:
            sp, cl = _fit._phase_expectations(planned, touched, self._pruned, self._clustered)
            hsp, hcl = _fit._held_expectations(self.plan, planned, held, self._pruned,
                                               self._clustered)
            sp, cl = {**hsp, **sp}, {**hcl, **cl}
            if sp or cl:
                self._guard = InvariantGuard(
                    sparsity=sp or None, clusters=cl or None, tolerance=self.tolerance,
                    mode="warn" if self.guard_mode == "warn" else "raise",
                    phase=planned.label, log_dir=self.log_dir,
                    per_channel=planned.per_channel or _fit._held_per_channel(
                        self.plan, planned, hcl))
                self._guard.set_model(self.model)
                self._guard.on_train_begin()

    def on_epoch_end(self, epoch, logs=None):
        if self._guard is not None:
            self._guard.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._engine is not None:  # get_weights() shows the zeros and shared values
            self._engine.settle(self.model)
        if self._distill_callbacks:  # the user's model trains as compiled in a later fit
            distill_mod.remove(self.model)
            self._distill_callbacks = []
        if self.log_dir is not None:
            dashboard.close(self.log_dir)
