"""The deployment-tree report: the origin document's results tables, plots.

`Report` holds what `explore` measured, one `LeafResult` per leaf, and
renders it as the origin's table per path (Baseline | Pruned/Clustered | QAT |
PQAT/CQAT/PCQAT, rows FP32 accuracy, INT8 accuracy, Compression), plus a table
of every leaf, CSV and JSON; `density_figure` is the origin's weight density
plot of one kernel through the pipeline, `pareto_figure` accuracy against
gzip size with the chosen leaf marked.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Dict, List, Optional

import numpy as np

from keras_colopt import stats
from keras_colopt._files import json_default, write_atomic

QAT_LEAVES = ("QAT", "PQAT", "CQAT", "PCQAT")
# The origin's three tables: (title, [(column header, leaf)]); "Baseline" reads the PTQ leaf.
PATHS = [
    ("PQAT path", [("Baseline", "PTQ"), ("Pruned", "Pruned+PTQ"), ("QAT", "QAT"),
                   ("PQAT", "PQAT")]),
    ("CQAT path", [("Baseline", "PTQ"), ("Clustered", "Clustered+PTQ"), ("QAT", "QAT"),
                   ("CQAT", "CQAT")]),
    ("PCQAT path", [("Baseline", "PTQ"), ("Pruned, sparsity-preserving clustered",
                                          "SparseClustered+PTQ"), ("QAT", "QAT"),
                    ("PCQAT", "PCQAT")]),
]
JSON_FIELDS = ("name", "tflite", "fp32_accuracy", "int8_accuracy", "tflite_bytes", "gzip_bytes",
               "latency_ms", "sparsity", "max_unique_weights", "status")
_TARGET_TEXT = {"max_accuracy_drop": "accuracy drop", "max_size_bytes": "gzip size",
                "max_latency_ms": "latency"}


@dataclasses.dataclass
class Baseline:
    """The trained baseline: Keras FP32 accuracy and its float `.tflite`."""

    fp32_accuracy: Optional[float] = None
    tflite: Optional[str] = None
    tflite_bytes: Optional[int] = None
    gzip_bytes: Optional[int] = None
    latency_ms: Optional[float] = None
    float_tflite_accuracy: Optional[float] = None
    status: str = "ok"
    reason: str = ""


@dataclasses.dataclass
class LeafResult:
    """One leaf of the deployment tree, as deployed.

    Attributes:
        name: the leaf ("PTQ", "Pruned+PTQ", "QAT", "PQAT", ...).
        status: "ok", "failed", "skipped" (the walk stopped above it),
            "interrupted" or "pending".
        reason: why it failed or was skipped.
        tflite: path of its int8 `.tflite`.
        fp32_accuracy: Keras accuracy of the model it was exported from (fake
            int8 for QAT leaves).
        int8_accuracy: accuracy of the `.tflite` run with LiteRT.
        tflite_bytes, gzip_bytes: raw and gzip -9 sizes of the `.tflite`.
        latency_ms: median time of one inference (batch 1, one thread).
        sparsity: fraction of zeros over all weight tensors of the `.tflite`.
        max_unique_weights: most distinct stored values in one weight tensor.
        max_unique_per_channel: most distinct stored values in one channel.
        weights_entropy_bytes: what an ideal order-0 coder needs for the stored weight
            tensors (`stats.entropy_bits`, summed, in bytes): the physical limit.
        weights_gzip_bytes: gzip -9 of the stored weight tensors alone, concatenated.
        sparse_tflite_bytes, sparse_runs: size of the converter's sparse
            encoding and whether LiteRT runs it (pruned leaves only).
        epochs: epochs on its path from the untrained model (what a separate
            run for this leaf alone would train).
        seconds: wall time spent on it (including nodes first built for it).
        meets_targets: whether it meets every target (None without targets).
        target_latency_ms, target_weight_bytes, target_sram_bytes, target_flash_bytes,
        target_cycles, target_cpu_ops, target_compiled: the leaf on `explore`'s `target`
            (`targets.TargetReport`: e.g. Vela's estimated latency, NPU-encoded weights,
            memory, the operators left to the CPU, the file for the device); None without.
        reused: measured by an earlier `explore` call with the same model, data sizes and
            settings (its files and results kept under `out_dir`), not trained by this one.
    """

    name: str
    status: str = "pending"
    reason: str = ""
    tflite: Optional[str] = None
    fp32_accuracy: Optional[float] = None
    int8_accuracy: Optional[float] = None
    tflite_bytes: Optional[int] = None
    gzip_bytes: Optional[int] = None
    latency_ms: Optional[float] = None
    sparsity: Optional[float] = None
    max_unique_weights: Optional[int] = None
    max_unique_per_channel: Optional[int] = None
    weights_entropy_bytes: Optional[float] = None
    weights_gzip_bytes: Optional[int] = None
    sparse_tflite_bytes: Optional[int] = None
    sparse_runs: Optional[str] = None
    epochs: Optional[int] = None
    seconds: Optional[float] = None
    meets_targets: Optional[bool] = None
    target_latency_ms: Optional[float] = None
    target_weight_bytes: Optional[int] = None
    target_sram_bytes: Optional[int] = None
    target_flash_bytes: Optional[int] = None
    target_cycles: Optional[int] = None
    target_cpu_ops: Optional[Dict[str, int]] = None
    target_compiled: Optional[str] = None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def progress_line(self) -> str:
        if not self.ok:
            return f"{self.name}: {self.status} ({self.reason})"
        return (f"{self.name}: int8 {_pct(self.int8_accuracy)} (Keras {_pct(self.fp32_accuracy)}"
                f"), {self.tflite_bytes:,} B -> {self.gzip_bytes:,} B gzipped, "
                f"{_ms(self.latency_ms)} ms, {100 * self.sparsity:.1f}% zeros, "
                f"<= {self.max_unique_per_channel} unique/channel "
                + ("(reused: measured by an earlier call)" if self.reused
                   else f"({self.seconds:.1f} s)"))


def _pct(v, digits=2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:,}"


@dataclasses.dataclass
class Report:
    """What `explore` measured. `str(report)` is its Markdown.

    Attributes:
        leaves: one `LeafResult` per requested leaf.
        baseline: the baseline's measurements.
        targets: {"max_accuracy_drop", "max_size_bytes", "max_latency_ms"} (None: no target).
        chosen: the smallest (gzip) leaf meeting every target, or None.
        missed: {target: text} for each target no built leaf met, with by how much.
        epochs_run: epochs this call trained (shared prefixes once; nodes and leaves reused
            from an earlier call's `out_dir/state` not at all).
        epochs_naive: epochs the leaves this call built would need, trained one run each.
    """

    leaves: List[LeafResult]
    targets: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)
    out_dir: Optional[str] = None
    settings: dict = dataclasses.field(default_factory=dict)
    baseline: Optional[Baseline] = None
    chosen: Optional[str] = None
    missed: Dict[str, str] = dataclasses.field(default_factory=dict)
    epochs_run: int = 0
    epochs_naive: int = 0
    wall_seconds: Optional[float] = None
    stage_kernels: Dict[str, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    plot_layer: Optional[str] = None
    target: Optional[str] = None

    # ------------------------------------------------------------------ what targets read
    def size_of(self, r: LeafResult) -> Optional[int]:
        """The size the size target applies to: the weights as the deployment target
        stores them (`target_weight_bytes`) with a target, else the gzipped `.tflite`."""
        return r.target_weight_bytes if self.target else r.gzip_bytes

    def latency_of(self, r: LeafResult) -> Optional[float]:
        """The latency the latency target applies to: the target's, else LiteRT's here."""
        return r.target_latency_ms if self.target else r.latency_ms

    def size_label(self) -> str:
        return f"weights on {self.target} (bytes)" if self.target else "gzipped int8 .tflite (bytes)"

    # ------------------------------------------------------------------ targets
    def leaf(self, name: str) -> Optional[LeafResult]:
        return next((r for r in self.leaves if r.name == name), None)

    def accuracy_drop(self, r: LeafResult) -> Optional[float]:
        if self.baseline is None or self.baseline.fp32_accuracy is None \
                or r.int8_accuracy is None:
            return None
        return self.baseline.fp32_accuracy - r.int8_accuracy

    def _values(self, r: LeafResult) -> Dict[str, Optional[float]]:
        return {"max_accuracy_drop": self.accuracy_drop(r), "max_size_bytes": self.size_of(r),
                "max_latency_ms": self.latency_of(r)}

    def misses(self, r: LeafResult) -> Dict[str, float]:
        """{target: how far beyond it `r` is} for each target `r` does not meet."""
        out = {}
        for key, value in self._values(r).items():
            limit = self.targets.get(key)
            if limit is not None and (value is None or value > limit):
                out[key] = float("inf") if value is None else value - limit
        return out

    def choose(self) -> Optional[str]:
        """Sets `meets_targets`, `chosen` and `missed` from the built leaves."""
        active = {k: v for k, v in self.targets.items() if v is not None}
        built = [r for r in self.leaves if r.ok]
        self.chosen, self.missed = None, {}
        for r in self.leaves:
            r.meets_targets = (not self.misses(r)) if (active and r.ok) else None
        if not active:
            return None
        meeting = [r for r in built if r.meets_targets]
        if meeting:
            self.chosen = min(meeting, key=lambda r: (self.size_of(r), -r.int8_accuracy)).name
            return self.chosen
        for key, limit in active.items():
            vals = [(v, r.name) for r in built for k, v in self._values(r).items()
                    if k == key and v is not None]
            if not vals:
                self.missed[key] = "no leaf was built"
                continue
            best, who = min(vals)
            if best > limit:
                self.missed[key] = (f"no leaf met {key}={_fmt_target(key, limit)}: the best, "
                                    f"{who}, has {_fmt_target(key, best)}, "
                                    f"{_fmt_target(key, best - limit)} too much")
        if not self.missed:
            self.missed["all targets"] = ("each target was met by some leaf, but no single "
                                          "leaf met all of them")
        return None

    # ------------------------------------------------------------------ formats
    def as_dict(self) -> dict:
        """The JSON content: `{"leaves": [...], "chosen": ...}` plus context."""
        leaves = []
        for r in self.leaves:
            d = {k: getattr(r, k) for k in JSON_FIELDS}
            d.update({k: v for k, v in dataclasses.asdict(r).items() if k not in d})
            d["accuracy_drop"] = self.accuracy_drop(r)
            leaves.append(d)
        return {"leaves": leaves, "chosen": self.chosen,
                "baseline": None if self.baseline is None else dataclasses.asdict(self.baseline),
                "targets": self.targets, "missed": self.missed,
                "epochs_run": self.epochs_run, "epochs_naive": self.epochs_naive,
                "wall_seconds": self.wall_seconds, "settings": self.settings,
                "plot_layer": self.plot_layer, "target": self.target}

    def to_json(self) -> str:
        """The report as a JSON string (see `as_dict`)."""
        return json.dumps(self.as_dict(), indent=2, default=json_default)

    def to_csv(self) -> str:
        """One row per leaf, the JSON leaf fields as columns."""
        rows = self.as_dict()["leaves"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(JSON_FIELDS),
                           lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buf.getvalue()

    def _cell(self, column: str, leaf: str, row: str) -> str:
        r = self.leaf(leaf)
        if row == "fp32" and column == "Baseline" and self.baseline is not None:
            return _pct(self.baseline.fp32_accuracy)
        if r is None:
            return "not requested"
        if not r.ok:
            return r.status
        if row == "fp32":
            return _pct(r.fp32_accuracy) + (" (Fake INT8)" if leaf in QAT_LEAVES else "")
        if row == "int8":
            return _pct(r.int8_accuracy)
        return (f"{r.tflite_bytes:,} → {r.gzip_bytes:,} "
                f"({100 * (1 - r.gzip_bytes / r.tflite_bytes):.2f}%)")

    def to_markdown(self) -> str:
        """The origin's table per path, then every leaf, targets and training saved."""
        out = ["# Deployment tree report", ""]
        b = self.baseline
        if b is not None and b.status == "ok":
            out.append(f"Baseline: FP32 accuracy {_pct(b.fp32_accuracy)} (Keras; "
                       f"{_pct(b.float_tflite_accuracy)} as a float .tflite), float .tflite "
                       f"{_num(b.tflite_bytes)} B → {_num(b.gzip_bytes)} B gzipped, "
                       f"{_ms(b.latency_ms)} ms per inference.")
        elif b is not None:
            out.append(f"Baseline: failed ({b.reason}).")
        n = self.settings.get("validation_samples")
        if n:
            out.append(f"Accuracies on {n} validation samples; INT8 = the int8 .tflite run "
                       "with LiteRT. Compression: int8 .tflite bytes → gzipped bytes "
                       "(reduction).")
        for title, columns in PATHS:
            if not any(self.leaf(leaf) is not None for _, leaf in columns[1:]):
                continue
            out += ["", f"## {title}", "",
                    "| | " + " | ".join(c for c, _ in columns) + " |",
                    "|---|" + "---:|" * len(columns)]
            for row, label in (("fp32", "FP32 Top-1 accuracy"),
                               ("int8", "INT8 full integer quantization"),
                               ("compression", "Compression")):
                out.append(f"| {label} | "
                           + " | ".join(self._cell(c, leaf, row) for c, leaf in columns) + " |")
        out += ["", "## Every leaf", "",
                "| leaf | status | FP32 / fake int8 | INT8 (LiteRT) | drop | .tflite B "
                "| gzip B | latency ms | zeros | max unique / tensor | max unique / channel "
                "| sparse .tflite B | targets |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.leaves:
            drop = self.accuracy_drop(r)
            meets = {None: "", True: "met", False: "missed"}[r.meets_targets]
            if r.name == self.chosen:
                meets = "**chosen**"
            out.append(
                f"| {r.name} | {r.status}{' (reused)' if r.reused else ''} | "
                f"{_pct(r.fp32_accuracy)} | {_pct(r.int8_accuracy)} | "
                f"{'-' if drop is None else f'{100 * drop:+.2f} pt'} | {_num(r.tflite_bytes)} | "
                f"{_num(r.gzip_bytes)} | "
                f"{_ms(r.latency_ms)} | "
                f"{_pct(r.sparsity, 1)} | {_num(r.max_unique_weights)} | "
                f"{_num(r.max_unique_per_channel)} | {_num(r.sparse_tflite_bytes)} | {meets} |")
        out += self._target_table()
        problems = [r for r in self.leaves if r.status not in ("ok", "pending")]
        if problems:
            out += [""] + [f"- {r.name} {r.status}: {r.reason}" for r in problems]
        coded = [r for r in self.leaves if r.ok and r.weights_entropy_bytes]
        if coded:
            out += ["", "Compression against the entropy bound (int8 weight tensors only):", "",
                    "| leaf | weights entropy B | weights gzip B | gzip / entropy "
                    "| whole .tflite gzip B |", "|---|---:|---:|---:|---:|"]
            for r in coded:
                out.append(f"| {r.name} | {r.weights_entropy_bytes:,.0f} | "
                           f"{_num(r.weights_gzip_bytes)} | "
                           f"{r.weights_gzip_bytes / r.weights_entropy_bytes:.2f} | "
                           f"{_num(r.gzip_bytes)} |")
        sparse = [r for r in self.leaves if r.sparse_runs]
        if sparse:
            out += ["", "Sparse weight encoding (`to_tflite(..., sparse=True)`), pruned leaves:",
                    "", "| leaf | int8 .tflite B | sparse int8 .tflite B | sparse / dense "
                    "| LiteRT runs it |", "|---|---:|---:|---:|---|"]
            for r in sparse:
                ratio = (f"{r.sparse_tflite_bytes / r.tflite_bytes:.2f}"
                         if r.sparse_tflite_bytes and r.tflite_bytes else "-")
                out.append(f"| {r.name} | {_num(r.tflite_bytes)} | "
                           f"{_num(r.sparse_tflite_bytes)} | {ratio} | {r.sparse_runs} |")
        active = {k: v for k, v in self.targets.items() if v is not None}
        out.append("")
        if active:
            text = dict(_TARGET_TEXT)
            if self.target:
                text.update(max_size_bytes=f"weights on {self.target}",
                            max_latency_ms=f"latency on {self.target}")
            out.append("Targets: " + ", ".join(f"{text[k]} ≤ {_fmt_target(k, v)}"
                                               for k, v in active.items())
                       + (f". Chosen: **{self.chosen}** (the smallest "
                          f"{'weights on ' + self.target if self.target else 'gzip size'} "
                          "meeting every target)." if self.chosen
                          else ". No leaf met every target."))
            out += [f"- {v}" for v in self.missed.values()]
        else:
            out.append("No targets given: every requested leaf was built, none is chosen.")
        reused = [r.name for r in self.leaves if r.reused]
        if self.epochs_naive:
            saved = self.epochs_naive - self.epochs_run
            out.append(f"Training: {self.epochs_run} epochs run; one separate run per leaf "
                       f"would train {self.epochs_naive} ({saved} saved by sharing prefixes"
                       f"{' and reusing saved nodes' if reused else ''}, "
                       f"{100 * saved / self.epochs_naive:.0f}%).")
        if reused:
            out.append(f"Reused from an earlier call with the same model, data sizes and "
                       f"settings (not trained by this one): {', '.join(reused)}.")
        if self.wall_seconds is not None:
            out.append(f"Wall time: {self.wall_seconds:.1f} s.")
        return "\n".join(out) + "\n"

    def _target_table(self) -> List[str]:
        """Each built leaf on the deployment target, and as a ratio to the PTQ leaf."""
        rows = [r for r in self.leaves if r.ok and r.target_latency_ms is not None]
        if not rows:
            return []
        ptq = self.leaf("PTQ")
        ptq = ptq if ptq is not None and ptq.ok and ptq.target_latency_ms else None

        def ratio(v, ref):
            return "-" if ref is None or not ref or v is None else f"{v / ref:.2f}x"

        out = ["", f"## On {self.target}", "",
               "| leaf | latency ms | vs PTQ | weights B | vs PTQ | SRAM B | flash B "
               "| cycles | CPU operators |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            cpu = ", ".join(f"{n} {op}" for op, n in sorted((r.target_cpu_ops or {}).items()))
            out.append(
                f"| {r.name} | {r.target_latency_ms:.4f} | "
                f"{ratio(r.target_latency_ms, ptq and ptq.target_latency_ms)} | "
                f"{_num(r.target_weight_bytes)} | "
                f"{ratio(r.target_weight_bytes, ptq and ptq.target_weight_bytes)} | "
                f"{_num(r.target_sram_bytes)} | {_num(r.target_flash_bytes)} | "
                f"{_num(r.target_cycles)} | {cpu or 'none'} |")
        return out

    def __str__(self):
        return self.to_markdown()

    # ------------------------------------------------------------------ plots
    def density_figure(self):
        """The origin's weight density plot: `plot_layer`'s kernel at each stage."""
        from matplotlib.figure import Figure

        order = ["Baseline", "Pruned", "Clustered", "SparseClustered",
                 "QAT", "PQAT", "CQAT", "PCQAT"]
        stages = [(s, self.stage_kernels[s][self.plot_layer]) for s in order
                  if self.plot_layer in self.stage_kernels.get(s, {})]
        fig = Figure(figsize=(7, 1.6 * max(1, len(stages)) + 0.6))
        if not stages:
            ax = fig.add_subplot(1, 1, 1)
            ax.set_title("no kernel to plot")
            return fig
        lo = min(float(w.min()) for _, w in stages)
        hi = max(float(w.max()) for _, w in stages)
        bins = np.linspace(lo, hi, 121) if hi > lo else 121
        for i, (stage, w) in enumerate(stages):
            ax = fig.add_subplot(len(stages), 1, i + 1)
            ax.hist(w, bins=bins, density=True, color=f"C{i}", label=stage)
            ax.set_title(f"{stage}: {w.size} weights, {stats.unique_values(w)} unique, "
                         f"{100 * stats.sparsity(w):.1f}% zeros", fontsize=9)
            ax.set_ylabel("density", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.axes[-1].set_xlabel(f"weight value of '{self.plot_layer}' kernel")
        fig.suptitle(f"Weight density of '{self.plot_layer}' through the pipeline", fontsize=10)
        fig.tight_layout()
        return fig

    def pareto_figure(self):
        """INT8 accuracy against gzip size per built leaf; Pareto front; chosen leaf."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        built = [r for r in self.leaves if r.ok and self.size_of(r) is not None]
        for i, r in enumerate(built):
            ax.scatter([self.size_of(r)], [100 * r.int8_accuracy], color=f"C{i % 10}",
                       label=r.name, zorder=3)
            ax.annotate(r.name, (self.size_of(r), 100 * r.int8_accuracy), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        front = pareto_front(built, self.size_of)
        if front:
            ax.step([self.size_of(r) for r in front], [100 * r.int8_accuracy for r in front],
                    where="post", color="grey", linestyle=":", label="Pareto front", zorder=2)
        chosen = self.leaf(self.chosen) if self.chosen else None
        if chosen is not None:
            ax.scatter([self.size_of(chosen)], [100 * chosen.int8_accuracy], s=300,
                       facecolors="none", edgecolors="red", linewidths=2,
                       label=f"chosen: {chosen.name}", zorder=4)
        b = self.baseline
        if b is not None and b.fp32_accuracy is not None:
            ax.axhline(100 * b.fp32_accuracy, color="black", linewidth=0.8,
                       label="baseline FP32")
            if self.targets.get("max_accuracy_drop") is not None:
                ax.axhline(100 * (b.fp32_accuracy - self.targets["max_accuracy_drop"]),
                           color="red", linestyle="--", linewidth=0.8,
                           label="accuracy target")
        if self.targets.get("max_size_bytes") is not None:
            ax.axvline(self.targets["max_size_bytes"], color="red", linestyle="-.",
                       linewidth=0.8, label="size target")
        ax.set_xlabel(self.size_label())
        ax.set_ylabel("INT8 accuracy, LiteRT (%)")
        ax.set_title("Deployment tree: accuracy vs size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str, plots: bool = True) -> Dict[str, str]:
        """Writes report.md/.csv/.json (and, with `plots`, density.png, pareto.png and a
        TensorBoard run `logs/report` with both images and the table), each atomically.

        Returns:
            {kind: path} of the files written.
        """
        files = {"markdown": os.path.join(out_dir, "report.md"),
                 "csv": os.path.join(out_dir, "report.csv"),
                 "json": os.path.join(out_dir, "report.json")}
        write_atomic(files["markdown"], self.to_markdown())
        write_atomic(files["csv"], self.to_csv())
        write_atomic(files["json"], self.to_json())
        if plots:
            pngs = {"density": _png(self.density_figure()), "pareto": _png(self.pareto_figure())}
            for kind, data in pngs.items():
                files[kind] = os.path.join(out_dir, f"{kind}.png")
                write_atomic(files[kind], data)
            files["tensorboard"] = os.path.join(out_dir, "logs", "report")
            _tensorboard(files["tensorboard"], self.to_markdown(), pngs)
        return files


def pareto_front(leaves: List[LeafResult], size=lambda r: r.gzip_bytes) -> List[LeafResult]:
    """The leaves no other leaf beats on both size (`size(leaf)`: gzip size by default) and
    INT8 accuracy, by size."""
    front = []
    for r in sorted(leaves, key=lambda r: (size(r), -r.int8_accuracy)):
        if not front or r.int8_accuracy > front[-1].int8_accuracy:
            front.append(r)
    return front


def _fmt_target(key: str, v: float) -> str:
    if key == "max_accuracy_drop":
        return f"{100 * v:.2f} pt"
    if key == "max_size_bytes":
        return f"{v:,.0f} B"
    return f"{v:.3f} ms"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _tensorboard(log_dir: str, markdown: str, pngs: Dict[str, bytes]) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.text("report/table", markdown, step=0)
        for kind, data in pngs.items():
            tf.summary.image(f"report/{kind}", tf.io.decode_png(data)[None], step=0)
    writer.flush()
    writer.close()
