"""CompressionMetrics and InvariantGuard: callbacks that watch a model's compression.

Both work in a plain `model.fit` (with a tfmot-wrapped model built by hand, or
an unwrapped one) and are installed by `collaborative_fit` and the drop-in
`CollaborativeOptimization`. Both are re-entrant: per-run state is reset in
`on_train_begin`, so one instance serves every phase of a run.
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from typing import Dict, Union

import numpy as np
import tensorflow as tf

from keras_colopt import invariants, stats
from keras_colopt.engines import get_engine
from keras_colopt.engines.base import Callback
from keras_colopt.kernels import effective_kernels, pooled
from keras_colopt.tensorboard import summary as dashboard

log = logging.getLogger("keras_colopt")


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
        self.layer_stats = {name: pooled(name, p) for name, p in parts.items()}
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
        kernels_from: a `CompressionMetrics` of the same fit that runs at every epoch end
            just before this guard, with no callback between them that changes weights:
            the kernels and counts it read at that epoch are checked, instead of being
            read and counted twice. Defaults to `None` (the guard reads them itself).

    Example:
        >>> guard = InvariantGuard(sparsity=0.5, clusters=8)
        >>> # model.fit(x, y, callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), guard])
    """

    def __init__(self, sparsity=None, clusters=None, mode="raise", tolerance=0.005,
                 per_channel=False, phase=None, log_dir=None, kernels_from=None):
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
        if kernels_from is not None and not isinstance(kernels_from, CompressionMetrics):
            raise ValueError("InvariantGuard: `kernels_from` must be a CompressionMetrics or "
                             f"None. Received: kernels_from={type(kernels_from).__name__}")
        self.kernels_from = kernels_from

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
        """`({layer: kernels}, {layer: their stats})` that `kernels_from` read at this
        epoch's end on this model, or two empty dicts."""
        metrics = self.kernels_from
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
