"""Search, not walk: the smallest model that meets the user's targets, on Optuna.

`explore` walks the origin's tree at one setting; `search` looks for the settings. Each
trial is one collaborative-optimization path, Prune -> sparsity-preserving Cluster -> PCQAT,
at settings an Optuna sampler proposes from a `SearchSpace` (sparsity or 2:4, clusters, per
tensor or per channel, which layers are left out, fine-tuning epochs). Its int8 `.tflite` is
exported, compiled for the target and measured exactly as an explore leaf
(`tree.measure_leaf`); the study's three objectives are that file's LiteRT accuracy, the
target's size and the target's latency. The report is their Pareto front, and the smallest
point that meets every target; the model as given, post-training int8, is one of the points
(when only it meets the targets, it is the answer).

Frugal on two cores:

- **Shared prefixes.** Pruned and clustered models are nodes, trained once and kept under
  `<out_dir>/state/nodes` (as explore keeps its own): trials with the same pruning share it,
  and a higher sparsity continues from the highest lower one already trained (80 % from
  70 %, with `initial_sparsity` = 70 %) instead of starting from the baseline again.
- **Early stops.** After pruning and after clustering (the rungs), a trial is stopped when
  another trial that compresses at least as hard was more accurate at the same rung (by more
  than the validation set's standard error), or, after clustering and once a finished trial
  meets the accuracy target, when its accuracy is further below that target than any of the
  finished trials (two at least) gained from there to its int8 file. Optuna's pruners are
  single-objective; these rules read the study itself, so they hold across workers.
- A proposal equal to a finished trial is not trained again: it reports that trial's values.

Storage: Optuna's RDB storage, a SQLite file `<out_dir>/search.db` by default: the same call
again resumes (finished trials stay, a trial cut by a kill is failed after its heartbeat
stops and run again). Several machines: the same call on each, with one shared
`storage="postgresql://..."` URL, run distinct trials of one study (Optuna's storage hands
them out; no lock files). `optuna-dashboard <storage>` and `optuna.visualization` read the
study; the keras_colopt dashboard shows the trials and the front under `<out_dir>/logs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import numbers
import os
import socket
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from keras_colopt._files import json_default, make_writable_folder, write_atomic
from keras_colopt.engines import get_engine
from keras_colopt.fit import collaborative_fit
from keras_colopt.kernels import effective_kernels
from keras_colopt.phases import Cluster, Prune, Quantize
from keras_colopt.report import Baseline, LeafResult, Report, _fmt_target
from keras_colopt.tree import (_accuracy, _baseline_teacher, _check_target, _reason, _samples,
                               check_inputs, measure_leaf)
from keras_colopt.tree_state import TreeState, fingerprint

log = logging.getLogger("keras_colopt")

LEAVE_OUT = ("none", "first", "last", "first+last")
OBJECTIVES = ("int8_accuracy", "weight_bytes", "latency_ms")
# A worker that stops sending heartbeats for GRACE_S seconds (killed, its machine lost) has
# its running trial failed, and the trial is run again by the next worker that starts one.
HEARTBEAT_S = 10
GRACE_S = 30
_RUNGS = ("pruned", "clustered")
MIN_FINISHED = 2  # finished trials before their gains from a rung judge another trial
# Optuna's trial states as this report names them ("pruned" would read as weight pruning)
STATES = {"COMPLETE": "complete", "PRUNED": "stopped early", "FAIL": "failed",
          "RUNNING": "running", "WAITING": "waiting"}
REFERENCE = "PTQ-reference"  # the model as given, post-training int8: a point like any other
REFERENCE_SETTINGS = {"pruning": "none", "sparsity": 0.0, "structure": None, "clusters": None,
                      "per_channel": None, "leave_out": None, "epochs": 0,
                      "continued_from": None}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What `search` may choose from. Each field is a non-empty sequence of choices.

    Attributes:
        sparsity: fractions of zeros for unstructured magnitude pruning, each in [0, 1).
        structure: `"unstructured"` (the `sparsity` choices) and/or `"2:4"` (keep 2 of every
            4 consecutive input weights: 50 %, on the layers whose input size 4 divides).
        clusters: cluster counts (>= 3: zero keeps one).
        per_channel: cluster per output channel (`True`) or per tensor (`False`).
        leave_out: which compressible layers are left dense (still int8): `"none"`,
            `"first"`, `"last"`, `"first+last"` (in the order the engine walks the model).
        epochs: fine-tuning epochs of each phase (Prune, Cluster, Quantize).
    """

    sparsity: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)
    structure: Sequence[str] = ("unstructured", "2:4")
    clusters: Sequence[int] = (4, 8, 16)
    per_channel: Sequence[bool] = (False, True)
    leave_out: Sequence[str] = ("none", "first", "last", "first+last")
    epochs: Sequence[int] = (1, 2, 4)

    def __post_init__(self):
        def check(name, ok, expected):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) \
                    or not values or len(set(values)) != len(values) \
                    or not all(ok(v) for v in values):
                raise ValueError(f"SearchSpace: `{name}` must be a non-empty sequence of "
                                 f"distinct {expected}. Received: {name}={values!r}")
            object.__setattr__(self, name, tuple(values))

        real = (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool))
        check("sparsity", lambda v: real(v) and 0 <= v < 1, "fractions in [0, 1), e.g. (0.5, 0.75)")
        check("structure", lambda v: v in ("unstructured", "2:4"),
              "'unstructured' and/or '2:4'")
        check("clusters", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
              and v >= 3, "integers >= 3 (zero takes one cluster), e.g. (4, 8, 16)")
        check("per_channel", lambda v: isinstance(v, bool), "booleans")
        check("leave_out", lambda v: v in LEAVE_OUT, f"values from {LEAVE_OUT}")
        check("epochs", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
              and v >= 1, "integers >= 1")

    def pruning_choices(self) -> List[str]:
        """The `pruning` parameter's choices: `"50%"`-style sparsities, and `"2:4"`."""
        out = []
        if "unstructured" in self.structure:
            out += [_percent(s) for s in sorted(self.sparsity)]
        if "2:4" in self.structure:
            out.append("2:4")
        return out

    def grid(self) -> Dict[str, list]:
        """The space as Optuna parameters `{name: choices}` (one trial = one of each)."""
        return {"pruning": self.pruning_choices(), "clusters": sorted(self.clusters),
                "per_channel": list(self.per_channel), "leave_out": list(self.leave_out),
                "epochs": sorted(self.epochs)}

    def grid_points(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def grid_epochs(self) -> int:
        """What a grid search trains: every point, each its own run of Prune, Cluster and
        Quantize at its epochs, from the baseline."""
        per_epochs = self.grid_points() // len(self.epochs)
        return per_epochs * sum(3 * e for e in self.epochs)

    def as_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _percent(s: float) -> str:
    return f"{100 * s:g}%"


def settings_of(params: dict) -> dict:
    """A trial's settings from its Optuna parameters."""
    pruning = params["pruning"]
    two_four = pruning == "2:4"
    return {"pruning": pruning, "sparsity": 0.5 if two_four else float(pruning[:-1]) / 100,
            "structure": "2:4" if two_four else "unstructured",
            "clusters": int(params["clusters"]), "per_channel": bool(params["per_channel"]),
            "leave_out": params["leave_out"], "epochs": int(params["epochs"])}


def describe(s: dict) -> str:
    if s.get("pruning") == "none":
        return "no compression: the model as given, post-training int8"
    return (f"prune {s['pruning']}, {s['clusters']} clusters "
            f"{'per channel' if s['per_channel'] else 'per tensor'}, "
            f"{'every layer' if s['leave_out'] == 'none' else s['leave_out'] + ' left out'}, "
            f"{s['epochs']} epoch{'s' if s['epochs'] > 1 else ''} a phase")


def _left_out(s: dict) -> set:
    return set() if s["leave_out"] == "none" else set(s["leave_out"].split("+"))


def compresses_as_hard(a: dict, b: dict, rung: int) -> bool:
    """Whether settings `a` compress at least as hard as `b` up to `rung` (0: pruned,
    1: clustered) with no more fine-tuning: as many zeros, in the same structure, on at least
    the same layers; and from rung 1 as few clusters, per tensor if `b` is."""
    if a["structure"] != b["structure"] or a["sparsity"] < b["sparsity"] \
            or not _left_out(a) <= _left_out(b) or a["epochs"] > b["epochs"]:
        return False
    if rung >= 1 and (a["clusters"] > b["clusters"] or a["per_channel"] > b["per_channel"]):
        return False
    return True


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether objective values `a` = (accuracy, size, latency) dominate `b`: no worse in
    any (accuracy higher is better, size and latency lower) and better in one."""
    no_worse = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return no_worse and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])


def pareto_front(points: Sequence, values) -> list:
    """The points no other point dominates (`values(point)` gives its objectives)."""
    return [p for p in points if not any(dominates(values(q), values(p)) for q in points
                                         if q is not p)]


@dataclasses.dataclass
class SearchPoint:
    """One trial that was trained, exported and measured.

    Attributes:
        name: `"trial <n>"`, the Optuna trial number.
        settings: what it chose (`pruning`, `sparsity`, `structure`, `clusters`,
            `per_channel`, `leave_out`, `epochs`; `continued_from`: the lower sparsity its
            pruning continued, or None).
        int8_accuracy: its `.tflite`'s accuracy, run with LiteRT on the validation data.
        tflite: the file.
        deployed: the file on the target: `weight_bytes` and `latency_ms` (the
            objectives; without a target, the gzipped file and LiteRT's latency here), and
            the target's other figures (`sram_bytes`, `flash_bytes`, `cycles`, `cpu_ops`).
        fp32_accuracy: the quantization-aware Keras model's accuracy (fake int8).
        leaf: every figure, as an explore leaf (`report.LeafResult`).
    """

    name: str
    settings: dict
    int8_accuracy: float
    tflite: str
    deployed: dict
    fp32_accuracy: Optional[float] = None
    trial: Optional[int] = None
    leaf: Optional[LeafResult] = None

    def values(self):
        return (self.int8_accuracy, self.deployed["weight_bytes"], self.deployed["latency_ms"])

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "settings", "int8_accuracy", "tflite",
                                              "deployed", "fp32_accuracy", "trial")}


@dataclasses.dataclass
class SearchReport:
    """What `search` found. `str(report)` is its Markdown.

    Attributes:
        front: the Pareto front of every trial the study finished (all workers, all calls):
            `SearchPoint`s, by size.
        chosen: the smallest point meeting every target, or None.
        missed: `{target: text}` for each target no point met (as in `explore`).
        trials_run: trials this call trained (not those it found finished, nor proposals
            equal to a finished trial).
        epochs_run: epochs this call trained.
        trials_study, epochs_study: the same over the whole study (every call and worker).
        epochs_grid: what a grid over the space would train (every point its own run).
        trials: every trial of the study: number, state, settings, values or why it stopped.
        baseline: the model as given: Keras accuracy, float weight bytes, its PTQ int8 file.
    """

    front: List[SearchPoint]
    chosen: Optional[SearchPoint]
    missed: Dict[str, str]
    trials_run: int
    epochs_run: int
    epochs_grid: int
    trials_study: int
    epochs_study: int
    grid_points: int
    trials: List[dict]
    baseline: dict
    targets: Dict[str, Optional[float]]
    target: Optional[str]
    study_name: str
    storage: str
    out_dir: str
    space: dict
    wall_seconds: Optional[float] = None

    def as_dict(self) -> dict:
        return {"front": [p.as_dict() for p in self.front],
                "chosen": None if self.chosen is None else self.chosen.as_dict(),
                "missed": self.missed, "trials_run": self.trials_run,
                "epochs_run": self.epochs_run, "trials_study": self.trials_study,
                "epochs_study": self.epochs_study, "epochs_grid": self.epochs_grid,
                "grid_points": self.grid_points, "trials": self.trials,
                "baseline": self.baseline, "targets": self.targets, "target": self.target,
                "study_name": self.study_name, "storage": self.storage, "space": self.space,
                "wall_seconds": self.wall_seconds}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=json_default)

    def to_markdown(self) -> str:
        b = self.baseline
        size = f"weights on {self.target}" if self.target else "gzipped .tflite"
        lat = f"latency on {self.target}" if self.target else "latency (LiteRT, here)"
        out = ["# Search report", "",
               f"Study `{self.study_name}` in `{self.storage}`. Baseline: FP32 accuracy "
               f"{_pct(b.get('fp32_accuracy'))}, float weights {b.get('float_weight_bytes'):,} B"
               + (f"; PTQ int8 {_pct(b['ptq']['int8_accuracy'])}, {size} "
                  f"{b['ptq']['weight_bytes']:,} B, {lat} {b['ptq']['latency_ms']:.4f} ms"
                  if b.get("ptq") else "") + ".", ""]
        active = {k: v for k, v in self.targets.items() if v is not None}
        if active:
            out.append("Targets: " + ", ".join(f"{k} ≤ {_fmt_target(k, v)}"
                                               for k, v in active.items()) + ".")
        if self.chosen is not None:
            c = self.chosen
            out.append(f"Chosen: **{c.name}** ({describe(c.settings)}): int8 "
                       f"{_pct(c.int8_accuracy)}, {c.deployed['weight_bytes']:,} B, "
                       f"{c.deployed['latency_ms']:.4f} ms; `{c.tflite}`.")
        elif active:
            out.append("No point met every target.")
        out += [f"- {v}" for v in self.missed.values()]
        out += ["", "## Pareto front", "",
                f"| point | settings | int8 accuracy | {size} B | x float | {lat} ms |",
                "|---|---|---:|---:|---:|---:|"]
        fw = b.get("float_weight_bytes")
        for p in self.front:
            ratio = f"{fw / p.deployed['weight_bytes']:.1f}x smaller" \
                if fw and p.deployed["weight_bytes"] else "-"
            star = " **chosen**" if self.chosen is not None and p.name == self.chosen.name \
                else ""
            out.append(f"| {p.name}{star} | {describe(p.settings)} | {_pct(p.int8_accuracy)} | "
                       f"{p.deployed['weight_bytes']:,} | {ratio} | "
                       f"{p.deployed['latency_ms']:.4f} |")
        out += ["", "## Every trial", "", "| trial | state | settings | result |",
                "|---|---|---|---|"]
        for t in self.trials:
            if t["state"] == "COMPLETE" and t.get("values"):
                a, w, ms = t["values"]
                res = f"int8 {_pct(a)}, {w:,.0f} B, {ms:.4f} ms"
                if t.get("duplicate_of") is not None:
                    res += f" (same settings as trial {t['duplicate_of']}: not trained again)"
            else:
                res = t.get("reason") or ""
            out.append(f"| {t['number']} | {STATES.get(t['state'], t['state'].lower())} | "
                       f"{describe(t['settings']) if t.get('settings') else '-'} | {res} |")
        out += ["", f"Training: {self.epochs_run} epochs run by this call over "
                f"{self.trials_run} trials; {self.epochs_study} over the study's "
                f"{self.trials_study} trained trials (every call and worker); a grid over the "
                f"space ({self.grid_points} points, each its own run) would train "
                f"{self.epochs_grid:,}."]
        if self.wall_seconds is not None:
            out.append(f"Wall time: {self.wall_seconds:.1f} s.")
        return "\n".join(out) + "\n"

    def __str__(self):
        return self.to_markdown()

    def save(self) -> Dict[str, str]:
        files = {"markdown": os.path.join(self.out_dir, "search.md"),
                 "json": os.path.join(self.out_dir, "search.json")}
        write_atomic(files["markdown"], self.to_markdown())
        write_atomic(files["json"], self.to_json())
        return files


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


class _Nodes:
    """The pruned and clustered models trials share: trained once, kept on disk."""

    def __init__(self, model, x, y, xv, yv, out_dir, fit_args, state: TreeState, layers,
                 sparsities):
        self.model, self.x, self.y, self.xv, self.yv = model, x, y, xv, yv
        self.sparsities = sorted(sparsities)  # what a higher sparsity may continue from
        self.out_dir, self.fit_args, self.state = out_dir, fit_args, state
        self.engine = get_engine(model)
        self.compile_cfg = self.engine.compile_config(model)
        self.layers = layers  # the compressible layers, in order, with their input sizes
        self.memory: Dict[str, tuple] = {}
        self.epochs_run = 0
        self._cluster_layers: Dict[tuple, set] = {}

    def log_dir(self, name):
        return os.path.join(self.out_dir, "logs", name)

    def fit(self, model, phases, start, name):
        result = collaborative_fit(model, self.x, self.y, phases=phases,
                                   validation_data=(self.xv, self.yv), initial_phase=start,
                                   log_dir=self.log_dir(name), **self.fit_args)
        self.epochs_run += sum(p.epochs for p in result.plan.phases[start:])
        return result.model

    def kept(self, s: dict) -> List[str]:
        names = [n for n, _ in self.layers]
        drop = set()
        if "first" in _left_out(s):
            drop.add(names[0])
        if "last" in _left_out(s):
            drop.add(names[-1])
        keep = [n for n in names if n not in drop]
        if s["structure"] == "2:4":
            keep = [n for n in keep if dict(self.layers)[n] % 4 == 0]
        if not keep:
            raise ValueError(f"{describe(s)} leaves no layer to compress")
        return keep

    def clustered_layers(self, s: dict) -> List[str]:
        """The kept layers that can take `s`'s clusters (a kernel with fewer weights than
        clusters cannot)."""
        key = (s["clusters"], s["per_channel"])
        if key not in self._cluster_layers:
            touched, _ = self.engine.select_layers(
                self.model, Cluster(clusters=s["clusters"], per_channel=s["per_channel"],
                                    epochs=1), "cluster")
            self._cluster_layers[key] = set(touched)
        keep = [n for n in self.kept(s) if n in self._cluster_layers[key]]
        if not keep:
            raise ValueError(f"{describe(s)}: no kept layer has more weights than clusters")
        return keep

    def prune_phase(self, s: dict, initial: float = 0.0) -> Prune:
        return Prune(sparsity=s["sparsity"], epochs=s["epochs"], initial_sparsity=initial,
                     m_by_n=(2, 4) if s["structure"] == "2:4" else None, layers=self.kept(s))

    def cluster_phase(self, s: dict) -> Cluster:
        return Cluster(clusters=s["clusters"], per_channel=s["per_channel"],
                       epochs=s["epochs"], layers=self.clustered_layers(s))

    @staticmethod
    def prune_key(s: dict) -> str:
        return (f"pruned_{s['pruning'].replace('%', 'pct').replace(':', 'of')}_"
                f"{s['leave_out'].replace('+', '_')}_e{s['epochs']}")

    def cluster_key(self, s: dict) -> str:
        return f"{self.prune_key(s)}_c{s['clusters']}{'_pc' if s['per_channel'] else ''}"

    def _get(self, key):
        if key not in self.memory:
            saved = self.state.load_node(key, self.engine.rebuild)
            if saved is None:
                return None
            model, acc = saved
            self.engine.compile_like(model, self.compile_cfg)
            meta_path = os.path.join(self.state.folder, "nodes", key + ".meta.json")
            with open(meta_path) as f:
                meta = json.load(f)
            self.memory[key] = (model, acc, meta)
        return self.memory[key]

    def _put(self, key, model, meta):
        model = self.engine.strip(model)
        self.engine.compile_like(model, self.compile_cfg)
        acc = _accuracy(model, self.xv, self.yv)
        # how it was made first: the node's own .json, written last, is the commit point
        write_atomic(os.path.join(self.state.folder, "nodes", key + ".meta.json"),
                     json.dumps(meta).encode())
        self.state.save_node(key, model, acc)
        self.memory[key] = (model, acc, meta)
        return self.memory[key]

    def pruned(self, s: dict):
        """(model, Keras accuracy, {"continued_from", "phase"}) of the pruned node."""
        key = self.prune_key(s)
        got = self._get(key)
        if got is not None:
            return got
        parent, initial = self.model, 0.0
        continued = None
        if s["structure"] == "unstructured":
            for lower in sorted((v for v in self.sparsities if v < s["sparsity"]),
                                reverse=True):
                below = self._get(self.prune_key(dict(s, pruning=_percent(lower))))
                if below is not None:
                    parent, initial, continued = below[0], lower, _percent(lower)
                    break
        phase = self.prune_phase(s, initial)
        t0 = time.time()
        dense = [n for n, _ in self.layers if n not in phase.layers]
        model = self.fit(parent, [phase], 0, key)
        got = self._put(key, model, {"continued_from": continued,
                                     "phase": phase.get_config()})
        log.info("search: %s trained (%s%.1f s), accuracy %.2f%%%s", key,
                 f"continues {continued}, " if continued else "", time.time() - t0,
                 100 * got[1], f"; left dense: {', '.join(dense)}" if dense else "")
        return got

    def clustered(self, s: dict):
        key = self.cluster_key(s)
        got = self._get(key)
        if got is not None:
            return got
        pruned, _, meta = self.pruned(s)
        prune = Prune.from_config(meta["phase"])
        t0 = time.time()
        model = self.fit(pruned, [prune, self.cluster_phase(s)], 1, key)
        got = self._put(key, model, {"continued_from": meta.get("continued_from"),
                                     "phase": meta["phase"]})
        log.info("search: %s trained (%.1f s), accuracy %.2f%%", key, time.time() - t0,
                 100 * got[1])
        return got

    def quantized(self, s: dict, name: str):
        clustered, _, meta = self.clustered(s)
        phases = [Prune.from_config(meta["phase"]), self.cluster_phase(s),
                  Quantize(epochs=s["epochs"])]
        return self.fit(clustered, phases, 2, name)


def _check_storage(storage) -> None:
    if isinstance(storage, str) and "://" not in storage:
        raise ValueError("`storage` must be an Optuna storage URL, e.g. "
                         "'postgresql://user:password@host/db' or 'sqlite:///search.db', or "
                         f"None for <out_dir>/search.db. Received: storage={storage!r}")


def _storage(storage, out_dir: str):
    """An Optuna storage with heartbeats (a killed worker's trial is failed and retried)."""
    import optuna

    if storage is None:
        storage = f"sqlite:///{os.path.join(out_dir, 'search.db')}"
    if not isinstance(storage, str):
        return storage, type(storage).__name__
    _check_storage(storage)
    kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else \
        {"pool_pre_ping": True}
    import sqlalchemy

    # Workers started together on a new database all create Optuna's tables; on PostgreSQL
    # all but one then fail (a duplicate enum type, measured in the two-worker test). The
    # tables exist by then: trying again joins them.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(
                    storage, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(
                        max_retry=2))
            break
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == 4:
                raise
            log.info("search: the storage was being set up by another worker (%s); trying "
                     "again", type(e).__name__)
            time.sleep(1 + attempt)
    shown = storage.split("@")[-1] if "@" in storage else storage  # no password in reports
    return rdb, shown


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError("`budget` must be a positive number of trials (trained or stopped "
                         f"early; every worker's together). Received: budget={budget!r}")
    return int(budget)


def search(model, x, y=None, *, validation_data, out_dir, target=None,
           max_accuracy_drop: Optional[float] = None, max_latency_ms: Optional[float] = None,
           max_size_bytes: Optional[int] = None, budget: int = 12,
           space: Optional[SearchSpace] = None, storage=None, study_name: Optional[str] = None,
           representative_data=None, latency_runs: int = 10, seed: Optional[int] = 0,
           batch_size=None, verbose: int = 0, **fit_kwargs) -> SearchReport:
    """Searches the compression settings for the Pareto front of accuracy, size and latency
    on `target`, and the smallest model meeting every target.

    Each trial prunes, clusters (preserving the zeros) and quantization-aware trains
    (PCQAT) a copy of `model` at the settings an Optuna sampler proposes from `space`, then
    exports a fully integer `.tflite` and measures it as an `explore` leaf: LiteRT accuracy
    on `validation_data`, the target's size and latency (Vela's, for an Ethos-U). Trials
    share their pruned and clustered prefixes, and weak ones stop after pruning or
    clustering (see the module's text). Everything goes under `out_dir`: the `.tflite` files,
    the nodes (`state/`), `search.md`/`search.json`, the Optuna study (`search.db`, unless
    `storage` is given) and TensorBoard logs (`logs/`, the keras_colopt dashboard's chart
    of the trials and the front in `logs/report`).

    Args:
        model: a compiled, trained classification model (integer labels), Keras 3 or
            tf_keras.
        x, y: training data, as for `collaborative_fit`.
        validation_data: `(x_val, y_val)` arrays every trial is measured on.
        out_dir: output folder. The same call again resumes the same study.
        target: `targets.EthosU(...)` or `targets.LiteRTCPU(...)`; None: the gzipped
            `.tflite` and LiteRT's latency here are the size and latency objectives.
        max_accuracy_drop: largest allowed drop of int8 accuracy below the model's, as a
            fraction (0.01 = 1 point).
        max_latency_ms, max_size_bytes: the target's latency and weight bytes allowed.
        budget: trials trained in the study in all (finished or stopped early; every worker
            and earlier call counted; a proposal equal to a finished trial is not trained and
            not counted): a resumed call runs what is left. Defaults to `12`. A space of at
            most `budget` points is searched as a grid.
        space: a `SearchSpace`. Defaults to `SearchSpace()`.
        storage: an Optuna storage URL shared by several workers (e.g.
            `"postgresql://user:pw@host/db"`), or None for `sqlite:///<out_dir>/search.db`.
        study_name: defaults to one derived from the model, data sizes and space, so that
            the same call on each machine joins the same study.
        representative_data: calibration inputs. Defaults to `x[:256]`.
        latency_runs: LiteRT inferences timed per point. Defaults to `10`.
        seed: the sampler's seed (None: random). With a `storage` given, each worker adds
            its process id to it, so that workers do not propose the same points. Defaults
            to `0`.
        batch_size, verbose, **fit_kwargs: as for `collaborative_fit`.

    Returns:
        A `SearchReport` (`front`, `chosen`, `missed`, `trials_run`, `epochs_run`, ...).

    Example:
        >>> r = colopt.search(model, x, y, validation_data=(xv, yv), out_dir="search",
        ...                   target=colopt.targets.EthosU("ethos-u55-128"),
        ...                   max_accuracy_drop=0.01, budget=16)
        >>> r.chosen.tflite, r.chosen.deployed["weight_bytes"]
    """
    import optuna

    t0 = time.time()
    targets = {"max_accuracy_drop": _check_target("max_accuracy_drop", max_accuracy_drop),
               "max_size_bytes": _check_target("max_size_bytes", max_size_bytes),
               "max_latency_ms": _check_target("max_latency_ms", max_latency_ms)}
    budget = _check_budget(budget)
    space = SearchSpace() if space is None else space
    if not isinstance(space, SearchSpace):
        raise ValueError("`space` must be a colopt.SearchSpace(...), e.g. "
                         "SearchSpace(sparsity=(0.5, 0.75), clusters=(4, 8)). Received: "
                         f"space={space!r}")
    xv, yv, representative_data = check_inputs("search", "trial", target, validation_data, x,
                                               representative_data, fit_kwargs)
    engine = get_engine(model)  # a clear error for an unsupported or uncompiled model
    layers = _compressible(model, engine)
    if not layers:
        raise ValueError(f"search: model '{model.name}' has no layer that can be pruned and "
                         "clustered. Expected Dense, Conv or other supported layers.")
    if len(layers) < 2 and set(space.leave_out) - {"none"}:
        raise ValueError(f"search: model '{model.name}' has one compressible layer "
                         f"({layers[0][0]}); leaving it out leaves nothing. Expected "
                         "space.leave_out=('none',).")
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_storage(storage)  # before anything is written
    make_writable_folder(out_dir, "`out_dir`", "the search (`out_dir`)")
    os.makedirs(os.path.join(out_dir, "tflite"), exist_ok=True)
    fit_args = dict(fit_kwargs, batch_size=batch_size, verbose=2 if verbose >= 2 else 0)
    # distill=True: every node learns from the model as given (not from the node it continues)
    fit_args.update(_baseline_teacher(model, fit_args.get("distill"), 0))
    settings = {"space": space.as_dict(), "validation_samples": int(len(xv)),
                "target": None if target is None else repr(target)}
    fp = fingerprint(model, _samples(x), len(xv), settings, fit_args)
    state = TreeState(out_dir, fp, kind="search")  # refuses another call's out_dir
    rdb, shown = _storage(storage, out_dir)
    study_name = study_name or "keras_colopt-" + hashlib.sha256(
        json.dumps(fp, sort_keys=True, default=repr).encode()).hexdigest()[:12]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    nodes = _Nodes(model, x, y, xv, yv, out_dir, fit_args, state, layers, space.sparsity)
    base_acc = _accuracy(model, xv, yv)
    tol = math.sqrt(max(base_acc * (1 - base_acc), 0.01) / len(xv))  # one standard error
    baseline = _baseline(model, engine, representative_data, xv, yv, base_acc, state, target,
                         out_dir, latency_runs)
    active = [k for k, v in targets.items() if v is not None]

    def constraints(trial) -> List[float]:
        v = trial.user_attrs.get("objectives")
        drop = base_acc - (v[0] if v else trial.user_attrs.get("stopped_accuracy", 0.0))
        got = {"max_accuracy_drop": drop, "max_size_bytes": v[1] if v else math.inf,
               "max_latency_ms": v[2] if v else math.inf}
        return [got[k] - targets[k] for k in active]

    grid = space.grid()
    if storage is not None and seed is not None:
        seed += os.getpid()  # workers sharing a study must not propose the same points
    if space.grid_points() <= budget:
        sampler = optuna.samplers.GridSampler(grid, seed=seed)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=min(8, max(2, budget // 3)),
                constraints_func=constraints if active else None)
    study = optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler,
                                directions=["maximize", "minimize", "minimize"],
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVES))
    if not isinstance(sampler, optuna.samplers.GridSampler):
        default = {"pruning": "50%", "clusters": 8, "per_channel": False, "leave_out": "none",
                   "epochs": 2}  # explore's default PCQAT: the point to beat
        if all(default[k] in grid[k] for k in default):
            study.enqueue_trial(default, skip_if_exists=True)
    ran = {"trials": 0}
    worker = {"host": socket.gethostname(), "pid": os.getpid()}
    size_of, latency_of = _objective_readers(target)

    def objective(trial):
        try:
            return run_trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # noqa: BLE001 - the trial fails, said; the others go on
            trial.set_user_attr("reason", f"failed: {_reason(e)}")
            log.warning("search trial %d failed: %s", trial.number, _reason(e))
            raise

    def run_trial(trial):
        s = settings_of({k: trial.suggest_categorical(k, grid[k]) for k in grid})
        trial.set_user_attr("settings", s)
        trial.set_user_attr("worker", worker)
        same = _finished_same(study, trial.number, s)
        if same is not None:
            if same.state == optuna.trial.TrialState.PRUNED:
                trial.set_user_attr("reason", f"same settings as trial {same.number}: "
                                    + same.user_attrs.get("reason", "stopped"))
                trial.set_user_attr("stopped_accuracy", same.user_attrs.get("stopped_accuracy"))
                trial.set_user_attr("duplicate_of", same.number)
                raise optuna.TrialPruned()
            for k in ("objectives", "result", "rung0", "rung1"):
                if k in same.user_attrs:
                    trial.set_user_attr(k, same.user_attrs[k])
            trial.set_user_attr("duplicate_of", same.number)
            log.info("search trial %d: %s: same as trial %d, not trained again", trial.number,
                     describe(s), same.number)
            return tuple(same.values)
        ran["trials"] += 1
        t1, e1 = time.time(), nodes.epochs_run
        for rung, stage in enumerate(_RUNGS):
            _, acc, meta = nodes.pruned(s) if rung == 0 else nodes.clustered(s)
            if rung == 0:
                s["continued_from"] = meta.get("continued_from")
                trial.set_user_attr("settings", s)
            trial.set_user_attr(f"rung{rung}", acc)
            why = _weak(study, trial.number, s, rung, acc, base_acc, tol,
                        targets["max_accuracy_drop"])
            if why:
                trial.set_user_attr("epochs", nodes.epochs_run - e1)
                trial.set_user_attr("reason", f"stopped after {stage}: {why}")
                trial.set_user_attr("stopped_accuracy", acc)
                log.info("search trial %d: %s: stopped after %s (%.2f%%): %s", trial.number,
                         describe(s), stage, 100 * acc, why)
                raise optuna.TrialPruned()
        name = f"trial {trial.number}"
        qat = nodes.quantized(s, f"trial_{trial.number}")
        leaf = measure_leaf(name, qat, _accuracy(qat, xv, yv), os.path.join(out_dir, "tflite"),
                            representative_data, xv, yv, target, latency_runs,
                            log_dir=nodes.log_dir(f"trial_{trial.number}"))
        leaf.seconds = time.time() - t1
        trial.set_user_attr("epochs", nodes.epochs_run - e1)
        values = (float(leaf.int8_accuracy), float(size_of(leaf)), float(latency_of(leaf)))
        trial.set_user_attr("objectives", values)
        trial.set_user_attr("result", json.loads(json.dumps(dataclasses.asdict(leaf),
                                                            default=json_default)))
        log.info("search trial %d: %s: int8 %.2f%%, %s B, %.4f ms (%.1f s)", trial.number,
                 describe(s), 100 * values[0], f"{values[1]:,.0f}", values[2], leaf.seconds)
        return values

    rng = np.random.default_rng(seed)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]

    def after_each(study_, trial_):
        _write(study_, report_args)
        counted = _counted(study_)
        if counted >= budget or len(study_.get_trials(
                deepcopy=False, states=(TrialState.FAIL,))) >= budget:
            study_.stop()
        elif trial_.user_attrs.get("duplicate_of") is not None:
            # The sampler proposed a finished point again: the next trial is one not yet
            # tried (none left: the space is searched).
            seen = [t.params for t in study_.get_trials(deepcopy=False)]
            fresh = [p for p in points if p not in seen]
            if not fresh:
                study_.stop()
            else:
                study_.enqueue_trial(fresh[int(rng.integers(len(fresh)))])

    report_args = dict(baseline=baseline, targets=targets, target=target, space=space,
                       study_name=study_name, storage=shown, out_dir=out_dir, ran=ran,
                       nodes=nodes, t0=t0)
    from optuna.trial import TrialState

    left = budget - _counted(study)
    if left > 0:
        log.info("search: study %s in %s: %d of %d trials to run", study_name, shown, left,
                 budget)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, catch=(Exception,), callbacks=[after_each])
    else:
        log.info("search: study %s already has its %d trials", study_name, budget)
    return _write(study, report_args)


def _compressible(model, engine) -> List[tuple]:
    """`[(layer path name, input size)]` of the layers a Prune phase touches by default."""
    touched, _ = engine.select_layers(model, Prune(epochs=1), "prune")
    kernels = effective_kernels(model, engine)
    out = []
    for name in touched:
        ks = kernels.get(name)
        shape = np.shape(ks[0][1]) if ks else ()
        out.append((name, int(shape[-2]) if len(shape) >= 2 else 0))
    return out


def _counted(study) -> int:
    """Trials that count toward the budget: trained (finished or stopped early), not a
    proposal equal to one already finished."""
    from optuna.trial import TrialState

    return sum(t.user_attrs.get("duplicate_of") is None for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _objective_readers(target):
    if target is None:
        return (lambda r: r.gzip_bytes), (lambda r: r.latency_ms)
    return (lambda r: r.target_weight_bytes), (lambda r: r.target_latency_ms)


def _finished_same(study, number, s):
    from optuna.trial import TrialState

    keys = ("pruning", "clusters", "per_channel", "leave_out", "epochs")
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        o = t.user_attrs.get("settings")
        if t.number != number and o and all(o[k] == s[k] for k in keys):
            return t
    return None


def _weak(study, number, s, rung, acc, base_acc, tol, max_drop) -> Optional[str]:
    """Why the trial should stop at `rung` with accuracy `acc` there, or None."""
    from optuna.trial import TrialState

    key = f"rung{rung}"
    seen = [t for t in study.get_trials(deepcopy=False)
            if t.number != number and key in t.user_attrs and t.user_attrs.get("settings")]
    for t in seen:
        o = t.user_attrs["settings"]
        if o["pruning"] == s["pruning"] and o["leave_out"] == s["leave_out"] \
                and o["epochs"] == s["epochs"] and (rung == 0 or (
                    o["clusters"] == s["clusters"] and o["per_channel"] == s["per_channel"])):
            continue  # the same node: the same accuracy
        if compresses_as_hard(o, s, rung) and t.user_attrs[key] > acc + tol:
            return (f"trial {t.number} ({describe(o)}) compresses at least as hard and was "
                    f"{100 * (t.user_attrs[key] - acc):.2f} points more accurate there")
    if max_drop is not None and rung == len(_RUNGS) - 1:
        # After clustering only Quantize is left, whose gain is small and alike across
        # trials; after pruning, Cluster's fine-tuning can recover much more, and unevenly.
        # Only once some finished trial meets the accuracy target: until then the front is
        # all there is to find, and a trial below the target may well be on it.
        finished = [t for t in seen if t.state == TrialState.COMPLETE
                    and "objectives" in t.user_attrs]
        recovered = [t.user_attrs["objectives"][0] - t.user_attrs[key] for t in finished]
        met = any(base_acc - t.user_attrs["objectives"][0] <= max_drop for t in finished)
        if met and len(recovered) >= MIN_FINISHED:
            best = max(recovered)
            if base_acc - acc - best > max_drop + tol:
                return (f"{100 * (base_acc - acc):.2f} points below the model, and no finished "
                        f"trial gained more than {100 * best:.2f} from there to int8: the "
                        f"accuracy target ({100 * max_drop:.2f} points) is out of reach")
    return None


def _baseline(model, engine, rep, xv, yv, acc, state, target, out_dir, latency_runs) -> dict:
    """The model as given: accuracy, float weight bytes, and its PTQ int8 file on the
    target (kept with the nodes: measured once per out_dir)."""
    params = sum(int(np.prod(np.shape(w))) for w in model.weights)
    out = {"fp32_accuracy": acc, "float_weight_bytes": 4 * params, "ptq": None, "leaf": None}
    saved = state.load_leaf(REFERENCE)
    if saved is not None:
        leaf = saved[0]
    else:
        try:
            leaf = measure_leaf(REFERENCE, model, acc, os.path.join(out_dir, "tflite"), rep, xv, yv,
                                target, latency_runs)
            state.save_leaf(leaf, None)
        except Exception as e:  # noqa: BLE001 - the reference is optional; said
            log.warning("search: the PTQ reference could not be measured: %s", _reason(e))
            return out
    size_of, latency_of = _objective_readers(target)
    out["ptq"] = {"int8_accuracy": leaf.int8_accuracy, "weight_bytes": size_of(leaf),
                  "latency_ms": latency_of(leaf), "tflite": leaf.tflite}
    out["leaf"] = leaf
    return out


def _point(t) -> SearchPoint:
    r = t.user_attrs["result"]
    known = {f.name for f in dataclasses.fields(LeafResult)}
    leaf = LeafResult(**{k: v for k, v in r.items() if k in known})
    leaf.name = f"trial {t.number}"
    return _point_of(leaf, t.user_attrs["settings"], t.user_attrs["objectives"], t.number)


def _point_of(leaf: LeafResult, settings: dict, objectives, number=None) -> SearchPoint:
    acc, weight_bytes, latency = objectives
    deployed = {"weight_bytes": int(weight_bytes), "latency_ms": latency,
                "sram_bytes": leaf.target_sram_bytes, "flash_bytes": leaf.target_flash_bytes,
                "cycles": leaf.target_cycles, "cpu_ops": leaf.target_cpu_ops,
                "gzip_bytes": leaf.gzip_bytes, "litert_latency_ms": leaf.latency_ms}
    return SearchPoint(name=leaf.name, settings=settings, int8_accuracy=acc,
                       tflite=leaf.tflite, deployed=deployed, fp32_accuracy=leaf.fp32_accuracy,
                       trial=number, leaf=leaf)


def _write(study, a) -> SearchReport:
    """The report from every trial in the study (all workers): files and the dashboard."""
    from optuna.trial import TrialState

    trials, points = [], []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "settings": t.user_attrs.get("settings"),
               "values": list(t.values) if t.values else None,
               "reason": t.user_attrs.get("reason"), "worker": t.user_attrs.get("worker"),
               "duplicate_of": t.user_attrs.get("duplicate_of"),
               "epochs": t.user_attrs.get("epochs"),
               "rungs": [t.user_attrs.get(f"rung{i}") for i in range(len(_RUNGS))]}
        trials.append(row)
        if t.state == TrialState.COMPLETE and "result" in t.user_attrs \
                and t.user_attrs.get("duplicate_of") is None:
            points.append(_point(t))
    ref = a["baseline"]["leaf"]
    if ref is not None:  # the model as given, int8: when it meets the targets, it is the answer
        size_of, latency_of = _objective_readers(a["target"])
        points.append(_point_of(ref, dict(REFERENCE_SETTINGS),
                                (ref.int8_accuracy, size_of(ref), latency_of(ref))))
    front = sorted(pareto_front(points, SearchPoint.values), key=lambda p: p.values()[1])
    # The chosen point and what was missed, as explore decides them.
    tree_report = Report(leaves=[p.leaf for p in points], targets=a["targets"],
                         target=None if a["target"] is None else a["target"].name,
                         baseline=Baseline(fp32_accuracy=a["baseline"]["fp32_accuracy"]))
    chosen_name = tree_report.choose()
    chosen = next((p for p in points if p.name == chosen_name), None)
    space = a["space"]
    report = SearchReport(
        front=front, chosen=chosen, missed=tree_report.missed, trials_run=a["ran"]["trials"],
        trials_study=_counted(study),
        epochs_study=sum(t["epochs"] or 0 for t in trials),
        epochs_run=a["nodes"].epochs_run, epochs_grid=space.grid_epochs(),
        grid_points=space.grid_points(), trials=trials,
        baseline={k: v for k, v in a["baseline"].items() if k != "leaf"},
        targets=a["targets"], target=None if a["target"] is None else a["target"].name,
        study_name=a["study_name"], storage=a["storage"], out_dir=a["out_dir"],
        space=space.as_dict(), wall_seconds=time.time() - a["t0"])
    report.save()
    _dashboard(report, tree_report, points, trials)
    return report


def _dashboard(report: SearchReport, tree_report: Report, points, trials) -> None:
    """The trials as the dashboard's leaves (`<out_dir>/logs/report`): its chart of
    accuracy against the target's size or latency, the front, the chosen point, each
    trial's settings."""
    from keras_colopt.tensorboard import summary
    from keras_colopt.tree import REPORT_RUN

    d = tree_report.as_dict()
    d["kind"] = "search"
    by_name = {p.name: p for p in points}
    front = {p.name for p in report.front}
    for leaf in d["leaves"]:
        p = by_name.get(leaf["name"])
        leaf["settings"] = describe(p.settings) if p else None
        leaf["on_front"] = leaf["name"] in front
    for t in trials:  # stopped and failed trials: rows of the table, not points
        if t["state"] != "COMPLETE" and t.get("settings"):
            d["leaves"].append({"name": f"trial {t['number']}",
                                "status": STATES.get(t["state"], t["state"].lower()),
                                "reason": t.get("reason") or "", "settings": describe(t["settings"])})
    d["epochs_run"], d["epochs_naive"] = report.epochs_run, report.epochs_grid
    d["search"] = {"trials_run": report.trials_run, "study_name": report.study_name,
                   "storage": report.storage, "grid_points": report.grid_points}
    summary.leaves(os.path.join(report.out_dir, "logs", REPORT_RUN), d, step=len(trials))

