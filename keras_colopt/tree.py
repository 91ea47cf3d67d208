"""The deployment tree of the origin document, walked in one call: `explore`.

```
Baseline ─┬─ PTQ, QAT
          ├─ Pruned ─┬─ Pruned+PTQ, PQAT
          │          └─ SparseClustered ── SparseClustered+PTQ, PCQAT
          └─ Clustered ── Clustered+PTQ, CQAT
```
Every leaf is built from the same baseline, and each inner node (Pruned,
Clustered, SparseClustered) is trained once and shared by the leaves below
it. Each leaf is measured as deployed: its int8 `.tflite` is run with LiteRT
(accuracy, latency), its weights inspected, its size taken raw and gzipped.

*When* the walk descends is `walk` (a pure function, tested on constructed
cases); *what* a leaf is, is `_Tree.leaf`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from keras_colopt.kernels import effective_kernels
from keras_colopt import distill as distill_mod
from keras_colopt import export
from keras_colopt._files import make_writable_folder
from keras_colopt.engines import get_engine
from keras_colopt.fit import collaborative_fit
from keras_colopt.phases import Cluster, Prune, Quantize, Train
from keras_colopt.plan import resolve
from keras_colopt.report import Baseline, LeafResult, Report
from keras_colopt.targets import EthosU, LiteRTCPU
from keras_colopt.tree_state import TreeState, fingerprint, slug

log = logging.getLogger("keras_colopt")

# leaf name -> (node it is built from, how: post-training or quantization-aware)
LEAVES: Dict[str, tuple] = {
    "PTQ": ("Baseline", "ptq"),
    "Pruned+PTQ": ("Pruned", "ptq"),
    "QAT": ("Baseline", "qat"),
    "PQAT": ("Pruned", "qat"),
    "Clustered+PTQ": ("Clustered", "ptq"),
    "CQAT": ("Clustered", "qat"),
    "SparseClustered+PTQ": ("SparseClustered", "ptq"),
    "PCQAT": ("SparseClustered", "qat"),
}
# node -> (parent, the phase that makes it from its parent)
NODES: Dict[str, tuple] = {
    "Baseline": (None, None),
    "Pruned": ("Baseline", "prune"),
    "Clustered": ("Baseline", "cluster"),
    "SparseClustered": ("Pruned", "cluster"),
}


def _depth(node: str) -> int:
    parent = NODES[node][0]
    return 0 if parent is None else 1 + _depth(parent)


def _under(node: str, ancestor: str) -> bool:
    while node is not None:
        if node == ancestor:
            return True
        node = NODES[node][0]
    return False


def walk(leaves: Sequence[str], build: Callable[[str], LeafResult],
         meets: Callable[[LeafResult], bool]) -> List[LeafResult]:
    """Builds the requested leaves level by level, as the origin recommends.

    Nodes are visited breadth first (Baseline; then Pruned and Clustered; then
    SparseClustered). At each node its requested leaves are built (post-training
    before quantization-aware). When one of them meets every target, the walk
    does not descend below that node: the deeper leaves are reported
    `skipped`. Without targets (`meets` always False) every leaf is built.

    Args:
        leaves: leaf names (keys of `LEAVES`).
        build: builds one leaf and returns its result (never raises for a leaf
            that fails: it returns status "failed").
        meets: whether a built leaf meets every target.

    Returns:
        One `LeafResult` per requested leaf, in the order of `leaves`.
    """
    done: Dict[str, LeafResult] = {}
    closed: Dict[str, str] = {}  # node -> leaf that met the targets there
    for node in sorted(NODES, key=_depth):
        here = [n for n in LEAVES if n in leaves and LEAVES[n][0] == node]
        if not here:
            continue
        stop = next(((a, leaf) for a, leaf in closed.items() if _under(node, a)
                     and a != node), None)
        for name in here:
            if stop is not None:
                done[name] = LeafResult(
                    name=name, status="skipped",
                    reason=f"{stop[1]}, built from {stop[0]}, met every target: the walk "
                           f"does not descend below {stop[0]}; not built")
                continue
            done[name] = build(name)
        if stop is None:
            met = next((r.name for r in (done[n] for n in here) if r.ok and meets(r)), None)
            if met is not None:
                closed[node] = met
    return [done[n] for n in leaves]


@dataclasses.dataclass
class _Node:
    model: object            # stripped, compiled tf_keras model
    phases: list             # the phases applied to get here (for later plans)
    fp32_accuracy: float


def _accuracy(model, x, y, batch_size=256) -> float:
    pred = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(pred, axis=-1) == np.asarray(y).reshape(-1)))


class _Tree:
    """Builds nodes once (cached) and leaves from them; all files go under `out_dir`."""

    def __init__(self, model, x, y, xv, yv, rep, out_dir, baseline_epochs, prune, cluster,
                 quantize, latency_runs, fit_args, state: TreeState, target=None):
        self.model, self.x, self.y, self.xv, self.yv = model, x, y, xv, yv
        self.rep, self.out_dir = rep, out_dir
        self.baseline_epochs = baseline_epochs
        self.make = {"prune": prune, "cluster": cluster}
        self.quantize = quantize
        self.latency_runs = latency_runs
        self.fit_args = fit_args
        self.engine = get_engine(model)
        self.compile_cfg = self.engine.compile_config(model)
        self.nodes: Dict[str, object] = {}  # name -> _Node or the exception that failed it
        self.epochs_run = 0
        self.stage_kernels: Dict[str, Dict[str, np.ndarray]] = {}
        self.state = state
        self.target = target

    def _fit(self, model, phases, start, log_name):
        result = collaborative_fit(model, self.x, self.y, phases=phases,
                                   validation_data=(self.xv, self.yv), initial_phase=start,
                                   log_dir=self.log_dir(log_name), **self.fit_args)
        self.epochs_run += sum(p.epochs for p in result.plan.phases[start:])
        return result

    def _keep_kernels(self, stage, model):
        self.stage_kernels[stage] = {
            name: np.concatenate([np.ravel(w) for _, w, _ in ks])
            for name, ks in effective_kernels(model, self.engine).items()}

    def phases_of(self, node: str) -> list:
        """The phases that make `node` from the model given to `explore`."""
        parent, kind = NODES[node]
        if parent is None:
            return [Train(epochs=self.baseline_epochs)] if self.baseline_epochs else []
        return self.phases_of(parent) + [self.make[kind]]

    def node(self, name: str) -> _Node:
        if name not in self.nodes:
            try:
                self.nodes[name] = self._saved_node(name) or self._build_node(name)
            except Exception as e:  # noqa: BLE001 - reported on every leaf below it
                self.nodes[name] = e
        got = self.nodes[name]
        if isinstance(got, Exception):
            raise _NodeFailed(name, got)
        return got

    def _saved_node(self, name: str) -> Optional[_Node]:
        phases = self.phases_of(name)
        saved = self.state.load_node(name, self.engine.rebuild) if phases else None
        if saved is None:
            return None
        model, fp32 = saved
        self.engine.compile_like(model, self.compile_cfg)
        self._keep_kernels(name, model)
        log.info("explore: %s reused, trained by an earlier call (%s), FP32 accuracy %.2f%%",
                 name, self.state.folder, 100 * fp32)
        return _Node(model=model, phases=phases, fp32_accuracy=fp32)

    def _build_node(self, name: str) -> _Node:
        parent_name, _ = NODES[name]
        phases = self.phases_of(name)
        t0 = time.time()
        if parent_name is None:
            if phases:
                model = self._fit(self.model, phases, 0, name).model
            else:
                model = self.engine.clone_model(self.model)
                self.engine.compile_like(model, self.compile_cfg)
        else:
            parent = self.node(parent_name)
            trained = self._fit(parent.model, phases, len(parent.phases), name).model
            model = self.engine.strip(trained)
            self.engine.compile_like(model, self.compile_cfg)
        self._keep_kernels(name, model)
        node = _Node(model=model, phases=phases,
                     fp32_accuracy=_accuracy(model, self.xv, self.yv))
        log.info("explore: %s trained (%.1f s), FP32 accuracy %.2f%%", name, time.time() - t0,
                 100 * node.fp32_accuracy)
        if phases:  # kept for the same call again (nothing to keep for an untrained baseline)
            self.state.save_node(name, model, node.fp32_accuracy)
        return node

    def path_epochs(self, leaf: str) -> int:
        node_name, how = LEAVES[leaf]
        epochs = self.quantize.epochs if how == "qat" else 0
        while node_name is not None:
            parent, kind = NODES[node_name]
            epochs += self.make[kind].epochs if kind else self.baseline_epochs
            node_name = parent
        return epochs

    def leaf(self, name: str) -> LeafResult:
        node_name, how = LEAVES[name]
        saved = self.state.load_leaf(name)
        if saved is not None:
            result, kernels = saved
            result.reused = True
            if kernels:
                self.stage_kernels[name] = kernels
            log.info("explore: %s reused, measured by an earlier call (%s)", name,
                     self.state.folder)
            return result
        t0 = time.time()
        try:
            node = self.node(node_name)
            if how == "ptq":
                model, fp32 = node.model, node.fp32_accuracy
            else:
                phases = node.phases + [self.quantize]
                model = self._fit(node.model, phases, len(node.phases), name).model
                self._keep_kernels(name, model)
                fp32 = _accuracy(model, self.xv, self.yv)
            result = self._measure(name, model, fp32, sparse=_under(node_name, "Pruned"))
        except _NodeFailed as e:
            result = LeafResult(name=name, status="failed",
                                reason=f"{e.node} failed: {_reason(e.error)}")
        except Exception as e:  # noqa: BLE001 - one leaf failing must not stop the others
            log.warning("explore: %s failed: %s", name, _reason(e))
            result = LeafResult(name=name, status="failed", reason=_reason(e))
        result.epochs = self.path_epochs(name)
        result.seconds = time.time() - t0
        if result.ok:
            self.state.save_leaf(result, self.stage_kernels.get(name) if how == "qat" else None)
        return result

    def log_dir(self, run: str) -> str:
        """The TensorBoard run folder of a node or QAT leaf (`logs/<name>`)."""
        return os.path.join(self.out_dir, "logs", run)

    def _measure(self, name, model, fp32, sparse) -> LeafResult:
        node, how = LEAVES[name]
        # The dashboard's "Deployed model" table goes to the run that trained the model: the
        # QAT leaf's own, or the node's for a post-training leaf.
        result = measure_leaf(name, model, fp32, os.path.join(self.out_dir, "tflite"),
                              self.rep, self.xv, self.yv, self.target, self.latency_runs,
                              log_dir=self.log_dir(name if how == "qat" else node))
        if sparse:
            self._sparse_variant(result, model)
        return result

    def _sparse_variant(self, result: LeafResult, model) -> None:
        """The converter's sparse weight encoding: its size, and whether LiteRT runs it."""
        path = os.path.join(self.out_dir, "tflite", f"{slug(result.name)}_int8_sparse.tflite")
        try:
            info = export.to_tflite(model, path, quantization="int8",
                                    representative_data=self.rep, sparse=True)
            result.sparse_tflite_bytes = info.tflite_bytes
            runtime = export.runtime_of(path)
            acc = export.evaluate_tflite(path, self.xv, self.yv)
            result.sparse_runs = f"yes, {runtime}; accuracy {100 * acc:.2f}%"
        except Exception as e:  # noqa: BLE001 - optional extra, reported
            result.sparse_runs = f"no: {_reason(e)}"


def measure_leaf(name, model, fp32, folder, rep, xv, yv, target, latency_runs,
                 log_dir=None) -> LeafResult:
    """One model as deployed: its int8 `.tflite` (`<folder>/<slug(name)>_int8.tflite`, fully
    integer for an Ethos-U `target`, which then compiles it with Vela), its LiteRT accuracy on
    `(xv, yv)` and latency, its weights as stored, and its figures on `target`. What every
    explore leaf and search trial is measured by."""
    npu = isinstance(target, EthosU)  # a fully integer file, as the NPU runs it
    info = export.to_tflite(model, os.path.join(folder, f"{slug(name)}_int8.tflite"),
                            quantization="int8", representative_data=rep, log_dir=log_dir,
                            io="int8" if npu else "float32", target=target if npu else None)
    weights = export.inspect_tflite(info.path)
    stored = export.read_weights(info.path)
    zeros = sum(w.sparsity * math.prod(w.shape) for w in weights)
    size = sum(math.prod(w.shape) for w in weights)
    result = LeafResult(
        name=name, status="ok", tflite=info.path, fp32_accuracy=fp32,
        int8_accuracy=export.evaluate_tflite(info.path, xv, yv),
        tflite_bytes=info.tflite_bytes, gzip_bytes=info.gzip_bytes,
        latency_ms=export.latency_ms(info.path, xv[:1], runs=latency_runs,
                                     num_threads=getattr(target, "threads", 1)),
        sparsity=zeros / max(1, size),
        max_unique_weights=max((w.unique for w in weights), default=0),
        max_unique_per_channel=max((w.unique_per_channel_max for w in weights), default=0),
        weights_entropy_bytes=sum(w.entropy_bits for w in weights) / 8,
        weights_gzip_bytes=export.gzip_size(b"".join(a.tobytes() for a in stored.values())))
    if npu:
        on = info.on_target
        result.target_latency_ms, result.target_weight_bytes = on.latency_ms, on.weight_bytes
        result.target_sram_bytes, result.target_flash_bytes = on.sram_bytes, on.flash_bytes
        result.target_cycles, result.target_cpu_ops = on.cycles, on.cpu_ops
        result.target_compiled = on.compiled
    elif target is not None:  # LiteRTCPU: its latency is the one measured above
        result.target_latency_ms = result.latency_ms
        result.target_weight_bytes = sum(int(a.nbytes) for a in stored.values())
        result.target_cpu_ops = {}
    return result


class _NodeFailed(Exception):
    def __init__(self, node, error):
        super().__init__(node)
        self.node, self.error = node, error


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _check_target(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a positive number or None. Received: "
                         f"{name}={value!r}")
    return float(value)


def _check_phase(name, value, cls):
    if not isinstance(value, cls):
        raise ValueError(f"`{name}` must be a colopt.{cls.__name__}(...) phase, e.g. "
                         f"{name}=colopt.{cls.__name__}(epochs=2). Received: {name}={value!r}")
    return value


def _baseline_teacher(model, distill, baseline_epochs: int) -> dict:
    """`distill=True` in `explore` distils every node from the baseline (not from the node it
    continues, which the copy `collaborative_fit` makes would be)."""
    settings = distill_mod.resolve(distill)
    if settings is None or settings.teacher is not None:
        return {}
    if baseline_epochs:
        raise ValueError(
            "explore(distill=...) without a teacher distils from the baseline, but "
            f"baseline_epochs={baseline_epochs} trains it inside the tree. Expected a trained "
            "baseline (baseline_epochs=0), or a teacher: distill=colopt.Distill(teacher=...).")
    return {"distill": dataclasses.replace(
        settings, teacher=distill_mod.frozen_copy(get_engine(model), model))}


def explore(model, x, y=None, *, validation_data, out_dir, leaves: Optional[Sequence[str]] = None,
            representative_data=None, baseline_epochs: int = 0,
            prune: Optional[Prune] = None, cluster: Optional[Cluster] = None,
            quantize: Optional[Quantize] = None, max_accuracy_drop: Optional[float] = None,
            max_size_bytes: Optional[int] = None, max_latency_ms: Optional[float] = None,
            plot_layer: Optional[str] = None, latency_runs: int = 50, batch_size=None,
            verbose: int = 0, target=None, **fit_kwargs) -> Report:
    """Builds and measures the leaves of the deployment tree from one baseline.

    Inner nodes are trained once and shared: the pruned model feeds Pruned+PTQ,
    PQAT and the sparsity-preserving clustering below it. Every leaf is an int8
    `.tflite` measured as deployed (LiteRT accuracy on `validation_data`,
    weights, raw and gzip size, median latency of one inference on this CPU),
    next to its Keras FP32 (or fake-quant, for QAT leaves) accuracy. A leaf
    that fails is reported with its reason and the others still run. The
    report (Markdown, CSV, JSON), the `.tflite` files, a weight density plot,
    a Pareto plot and TensorBoard logs are written under `out_dir`, the table
    after every leaf. `tensorboard --logdir <out_dir>/logs` shows them in the
    keras_colopt dashboard: a run per trained node and QAT leaf (its per-layer
    heatmaps, invariant checks and the `.tflite` files made from it) and the
    run `report` (every leaf, the accuracy-against-size chart, the chosen leaf).

    With targets, the tree is walked level by level (see `walk`): a branch is
    not descended below a node one of whose leaves meets every target, and
    `report.chosen` is the smallest (gzip) leaf that meets them all;
    `report.missed` says which target no leaf met and by how much.

    Args:
        model: a compiled tf_keras classification model (integer labels), the
            trained baseline; or untrained, with `baseline_epochs`.
        x, y: training data as for `collaborative_fit`.
        validation_data: `(x_val, y_val)` arrays every leaf is measured on.
        out_dir: output folder (created; existing files in it are replaced
            only by files of the same name). Each trained node and measured
            leaf is kept in `out_dir/state` as it finishes: the same call
            again reuses them (`LeafResult.reused`); a call with another
            model, data size or settings raises `StateMismatch` before
            training.
        leaves: which leaves, from `LEAVES`. Defaults to all eight.
        representative_data: calibration inputs for post-training int8.
            Defaults to the first 256 samples of `x` (when `x` is an array).
        baseline_epochs: epochs to train the baseline first. Defaults to `0`
            (the model is already trained).
        prune: the Prune phase of the pruned branch. Defaults to
            `Prune(sparsity=0.5, epochs=2)`.
        cluster: the Cluster phase of both clustered branches. Defaults to
            `Cluster(clusters=8, epochs=2)`.
        quantize: the Quantize phase of every QAT leaf. Defaults to
            `Quantize(epochs=2)`.
        max_accuracy_drop: largest allowed drop of int8 (LiteRT) accuracy below
            the baseline's FP32 accuracy, as a fraction (0.01 = 1 point).
        max_size_bytes: largest allowed gzipped `.tflite` size; with a `target`, the
            weights as the target stores them (NPU-encoded on Ethos-U).
        max_latency_ms: largest allowed median latency of one inference; with a
            `target`, the target's (Vela's estimate on Ethos-U).
        target: where the leaves will run: `targets.EthosU(...)` exports every leaf
            fully integer (`io="int8"`), compiles it with Vela and reports and
            targets its figures (latency, encoded weights, memory, CPU operators;
            the gzip size and the LiteRT latency stay columns);
            `targets.LiteRTCPU(threads=n)` measures the latency with `n` threads.
            Defaults to None (LiteRT on this CPU, one thread, float-I/O files).
        plot_layer: the layer whose kernel the density plot follows. Defaults
            to the largest pruned layer.
        latency_runs: measured inferences per leaf. Defaults to `50`.
        batch_size: as for `Model.fit`.
        verbose: 0 prints a line per leaf through the `keras_colopt` logger,
            2 also Keras' per-epoch lines. Defaults to `0`.
        **fit_kwargs: other `collaborative_fit` / `Model.fit` arguments.

    Returns:
        A `Report`.

    Example:
        >>> report = colopt.explore(model, x, y, validation_data=(xv, yv),
        ...                         out_dir="tree", max_accuracy_drop=0.01)
        >>> print(report.to_markdown()); report.chosen
    """
    t0 = time.time()
    leaves = list(LEAVES) if leaves is None else list(leaves)
    unknown = [n for n in leaves if n not in LEAVES]
    if not leaves or unknown or len(set(leaves)) != len(leaves):
        raise ValueError(f"`leaves` must be distinct names of deployment-tree leaves. Expected "
                         f"a non-empty subset of {list(LEAVES)}. Received: leaves={leaves!r}")
    targets = {"max_accuracy_drop": _check_target("max_accuracy_drop", max_accuracy_drop),
               "max_size_bytes": _check_target("max_size_bytes", max_size_bytes),
               "max_latency_ms": _check_target("max_latency_ms", max_latency_ms)}
    prune = _check_phase("prune", prune if prune is not None else Prune(sparsity=0.5, epochs=2),
                         Prune)
    cluster = _check_phase("cluster", cluster if cluster is not None
                           else Cluster(clusters=8, epochs=2), Cluster)
    quantize = _check_phase("quantize", quantize if quantize is not None
                            else Quantize(epochs=2), Quantize)
    if isinstance(baseline_epochs, bool) or not isinstance(baseline_epochs, int) \
            or baseline_epochs < 0:
        raise ValueError("`baseline_epochs` must be an int >= 0 (0: the model is already "
                         f"trained). Received: baseline_epochs={baseline_epochs!r}")
    xv, yv, representative_data = check_inputs("explore", "leaf", target, validation_data, x,
                                               representative_data, fit_kwargs)
    get_engine(model)  # a clear error for an unsupported or uncompiled model
    # Every path's phase order, before any training.
    for leaf in leaves:
        node, how = LEAVES[leaf]
        path = []
        while NODES[node][1]:
            path.insert(0, {"prune": prune, "cluster": cluster}[NODES[node][1]])
            node = NODES[node][0]
        phases = (([Train(epochs=baseline_epochs)] if baseline_epochs else []) + path
                  + ([quantize] if how == "qat" else []))
        if phases:
            resolve(phases)
    out_dir = os.path.abspath(os.fspath(out_dir))
    make_writable_folder(out_dir, "`out_dir`", "the report (`out_dir`)")
    os.makedirs(os.path.join(out_dir, "tflite"), exist_ok=True)

    fit_args = dict(fit_kwargs, batch_size=batch_size, verbose=2 if verbose >= 2 else 0)
    fit_args.update(_baseline_teacher(model, fit_args.get("distill"), baseline_epochs))
    settings = {"prune": prune.get_config(), "cluster": cluster.get_config(),
                "quantize": quantize.get_config(), "baseline_epochs": baseline_epochs,
                "validation_samples": int(len(xv)),
                "target": None if target is None else repr(target)}
    # Refused here, before any training, if out_dir holds another call's nodes and leaves.
    state = TreeState(out_dir, fingerprint(model, _samples(x), len(xv), settings, fit_args))
    tree = _Tree(model, x, y, xv, yv, representative_data, out_dir, baseline_epochs, prune,
                 cluster, quantize, latency_runs, fit_args, state, target)
    report = Report(leaves=[LeafResult(name=n, status="pending") for n in leaves],
                    targets=targets, out_dir=out_dir, settings=settings,
                    target=None if target is None else target.name)

    def meets(r: LeafResult) -> bool:
        return any(v is not None for v in targets.values()) and not report.misses(r)

    def build(name: str) -> LeafResult:
        i = leaves.index(name)
        log.info("explore [%d/%d] %s ...", i + 1, len(leaves), name)
        r = tree.leaf(name)
        if report.baseline is None:
            report.baseline = _baseline(tree, out_dir)
        report.leaves[i] = r
        log.info("explore [%d/%d] %s", i + 1, len(leaves), r.progress_line())
        report.epochs_run = tree.epochs_run
        report.save(out_dir, plots=False)
        _dashboard(report, out_dir)
        return r

    try:
        results = walk(leaves, build, meets)
        report.leaves = results
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM turned into an exception): keep what was measured.
        for r in report.leaves:
            if r.status == "pending":
                r.status, r.reason = "interrupted", "the run was interrupted before this leaf"
        report.epochs_run = tree.epochs_run
        report.wall_seconds = time.time() - t0
        report.save(out_dir, plots=False)
        _dashboard(report, out_dir)
        raise
    report.epochs_run = tree.epochs_run
    report.epochs_naive = sum(r.epochs or 0 for r in results
                              if r.status in ("ok", "failed") and not r.reused)
    report.choose()
    report.stage_kernels = tree.stage_kernels
    report.plot_layer = plot_layer or _default_plot_layer(tree, prune)
    report.wall_seconds = time.time() - t0
    report.save(out_dir, plots=True)
    _dashboard(report, out_dir)
    log.info("explore: done in %.1f s; %d epochs trained (a separate run per leaf would train "
             "%d); chosen: %s", report.wall_seconds, report.epochs_run, report.epochs_naive,
             report.chosen)
    return report


def check_inputs(who: str, what: str, target, validation_data, x, representative_data,
                 fit_kwargs: dict):
    """`(x_val, y_val, representative_data)` checked for `explore` and `search` (`who`),
    whose `what`s (leaves, trials) each get an int8 file measured on the validation data; a
    ValueError naming the argument otherwise."""
    if target is not None and not isinstance(target, (EthosU, LiteRTCPU)):
        raise ValueError("`target` must be a deployment target: colopt.targets.EthosU("
                         "'ethos-u55-128') or colopt.targets.LiteRTCPU(threads=1), or None. "
                         f"Received: target={target!r}")
    if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
        raise ValueError("`validation_data` must be a tuple (x_val, y_val) of arrays: every "
                         f"{what}'s .tflite is run on it with LiteRT. Received: "
                         f"{type(validation_data).__name__}")
    xv, yv = (np.asarray(a) for a in validation_data)
    if len(xv) == 0 or len(xv) != len(yv):
        raise ValueError("`validation_data` must hold the same positive number of inputs and "
                         f"labels. Received: {len(xv)} inputs, {len(yv)} labels.")
    if representative_data is None:
        if not hasattr(x, "__len__") or isinstance(x, dict):
            raise ValueError("`representative_data` is required when `x` is not an array: "
                             f"post-training int8 {what} files need calibration inputs. Pass "
                             "e.g. representative_data=x_sample[:256].")
        representative_data = np.asarray(x)[:256]
    for extra in ("validation_data", "initial_phase", "log_dir", "phases"):
        if extra in fit_kwargs:
            raise ValueError(f"{who} manages `{extra}` for every {what}; remove it. "
                             f"Received: {extra}={fit_kwargs[extra]!r}")
    return xv, yv, representative_data


def _samples(x) -> Optional[int]:
    """How many training samples `x` holds, when it can say (arrays, a dict of them)."""
    if isinstance(x, dict):
        x = next(iter(x.values()), None)
    try:
        return int(len(x))
    except TypeError:  # a generator or a dataset of unknown size
        return None


REPORT_RUN = "report"  # <out_dir>/logs/report: the report's TensorBoard run, the leaves' table


def _dashboard(report: Report, out_dir: str) -> None:
    """The leaves so far, for the keras_colopt dashboard (`<out_dir>/logs/report`); the step
    counts the leaves done, so the latest summary is the newest table."""
    from keras_colopt.tensorboard import summary

    done = sum(r.status not in ("pending",) for r in report.leaves)
    summary.leaves(os.path.join(out_dir, "logs", REPORT_RUN), report.as_dict(), step=done)


def _baseline(tree: _Tree, out_dir: str) -> Baseline:
    try:
        node = tree.node("Baseline")
    except _NodeFailed as e:
        return Baseline(status="failed", reason=_reason(e.error))
    info = export.to_tflite(node.model, os.path.join(out_dir, "tflite", "baseline_float.tflite"),
                            quantization="none", log_dir=tree.log_dir("Baseline"))
    return Baseline(fp32_accuracy=node.fp32_accuracy, tflite=info.path,
                    tflite_bytes=info.tflite_bytes, gzip_bytes=info.gzip_bytes,
                    latency_ms=export.latency_ms(info.path, tree.xv[:1], runs=tree.latency_runs),
                    float_tflite_accuracy=export.evaluate_tflite(info.path, tree.xv, tree.yv))


def _default_plot_layer(tree: _Tree, prune: Prune) -> Optional[str]:
    kernels = tree.stage_kernels.get("Baseline") or next(iter(tree.stage_kernels.values()), {})
    if not kernels:
        return None
    names = prune.layers if isinstance(prune.layers, list) else list(kernels)
    names = [n for n in names if n in kernels] or list(kernels)
    return max(names, key=lambda n: kernels[n].size)


