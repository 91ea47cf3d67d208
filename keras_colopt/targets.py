"""Deployment targets: what a `.tflite` costs where it will run.

`EthosU` compiles the file with Arm's Vela (the `ethos-u-vela` package, run in this process
from its Python entry point) for an Ethos-U55, U65 or U85 and reads Vela's own outputs: the
summary CSV (estimated inference time, NPU-encoded weight bytes, memory used), the per-layer
CSV (which operators fall back to the CPU) and the debug database (per operator: cycles, MACs,
encoded weight bytes, distinct and zero weights). Vela's output folder is kept beside the file:
`<stem>_vela.tflite` in it is what goes on the device.

`LiteRTCPU` is the latency of the file in LiteRT on this machine's CPU (`export.latency_ms`).

Both return a `TargetReport`:

```python
report = colopt.targets.EthosU("ethos-u55-128").measure("model_int8.tflite")
report.latency_ms, report.weight_bytes, report.cpu_ops   # 0.027, 8736, {}
for layer in report.layers:
    print(layer.name, layer.weight_bytes, layer.cycles)
```
Vela's figures are its estimates for the chosen system configuration and memory mode (Vela's
defaults unless given), not a measurement on silicon.
"""

from __future__ import annotations

import collections
import configparser
import contextlib
import csv
import dataclasses
import io
import os
import re
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional

import numpy as np

from keras_colopt import export


class TargetError(ValueError):
    """A target cannot take a file (a float model for an NPU, a file Vela cannot compile)."""


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One operator of the file on the target (Vela's per-operator figures).

    Attributes:
        name: the operator's output tensor in the `.tflite` (its Keras layer's name is in it).
        operator: its type (Conv2D, FullyConnected, DepthwiseConv2D, ...).
        placement: "NPU" or "CPU".
        cycles: estimated cycles (the NPU's, or the memory's when that is slower).
        macs: multiply-accumulates.
        weight_bytes: its NPU-encoded weights (None: no weights).
        scale_bytes: its encoded scales and biases (None: not reported separately).
        distinct_weights: distinct weight values Vela saw (its palette holds at most 32).
        zero_weights: Vela's `weight_zero` count for the operator's weight stream (its debug
            database's figure, as Vela counts it: not the file's zero weights).
    """

    name: str
    operator: str
    placement: str
    cycles: int = 0
    macs: int = 0
    weight_bytes: Optional[int] = None
    scale_bytes: Optional[int] = None
    distinct_weights: Optional[int] = None
    zero_weights: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class TargetReport:
    """What a `.tflite` costs on a target.

    Attributes:
        target: the target's name ("ethos-u55-128", "litert-cpu-1-thread").
        file: the `.tflite` measured.
        latency_ms: estimated (Vela) or measured (LiteRT) time of one inference.
        weight_bytes: the weights as the target stores them (NPU-encoded for Ethos-U).
        original_weight_bytes: the weights as the `.tflite` stores them.
        sram_bytes, flash_bytes, dram_bytes: memory used (Ethos-U; None elsewhere).
        cycles: estimated cycles of one inference (Ethos-U).
        macs: multiply-accumulates of one inference (Ethos-U).
        npu_ops: operators that run on the NPU.
        cpu_ops: {operator type: count} of the operators left to the CPU.
        system_config, memory_mode: the Vela configuration used.
        layers: per operator, `LayerCost`, in the order Vela ran them.
        compiled: the file to put on the device (`<stem>_vela.tflite`), or None.
        output_dir: the folder holding Vela's outputs, or None.
    """

    target: str
    file: str
    latency_ms: float
    weight_bytes: int
    original_weight_bytes: int
    sram_bytes: Optional[int] = None
    flash_bytes: Optional[int] = None
    dram_bytes: Optional[int] = None
    cycles: Optional[int] = None
    macs: Optional[int] = None
    npu_ops: int = 0
    cpu_ops: Dict[str, int] = dataclasses.field(default_factory=dict)
    system_config: Optional[str] = None
    memory_mode: Optional[str] = None
    layers: List[LayerCost] = dataclasses.field(default_factory=list)
    compiled: Optional[str] = None
    output_dir: Optional[str] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        def num(v):
            return "-" if v is None else f"{v:,}"

        lines = [f"# {os.path.basename(self.file)} on {self.target}", ""]
        if self.system_config:
            lines.append(f"Vela estimate, system config {self.system_config}, memory mode "
                         f"{self.memory_mode}.")
        lines += [f"- latency: {self.latency_ms:.4f} ms per inference",
                  f"- weights: {num(self.weight_bytes)} B on the target "
                  f"({num(self.original_weight_bytes)} B in the .tflite)"]
        if self.system_config:
            lines += [f"- SRAM {num(self.sram_bytes)} B, flash {num(self.flash_bytes)} B, "
                      f"DRAM {num(self.dram_bytes)} B; {num(self.cycles)} cycles, "
                      f"{num(self.macs)} MACs",
                      f"- operators: {self.npu_ops} on the NPU, "
                      + (", ".join(f"{n} x {op}" for op, n in sorted(self.cpu_ops.items()))
                         + " on the CPU" if self.cpu_ops else "none on the CPU")]
        if self.compiled:
            lines.append(f"- the file for the device: {self.compiled}")
        if self.layers:
            lines += ["", "| operator | type | on | cycles | MACs | encoded weights B "
                          "| distinct weights | zeros (Vela) |",
                      "|---|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {c.name} | {c.operator} | {c.placement} | {num(c.cycles)} | "
                      f"{num(c.macs)} | {num(c.weight_bytes)} | {num(c.distinct_weights)} | "
                      f"{num(c.zero_weights)} |" for c in self.layers]
        return "\n".join(lines) + "\n"

    def __str__(self):
        return self.to_markdown()


def _vela():
    try:
        from ethosu.vela import vela
        from ethosu.vela.architecture_features import Accelerator
    except ImportError as e:  # a dependency: only a broken install gets here
        raise ImportError("keras_colopt.targets.EthosU needs Arm's Vela compiler: "
                          "pip install ethos-u-vela") from e
    return vela, Accelerator


def _config_file() -> str:
    vela, _ = _vela()  # ethosu is a namespace package: its config files sit beside vela/
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(vela.__file__))),
                        "config_files", "Arm", "vela.ini")


def _sections(prefix: str) -> List[str]:
    parser = configparser.ConfigParser()
    parser.read(_config_file())
    return [s.split(".", 1)[1] for s in parser.sections() if s.startswith(prefix + ".")]


def _integer_file(path: str) -> None:
    """Raises TargetError for a file an NPU cannot run: float tensors between the operators
    (a float or dynamic-range file)."""
    try:
        floats = export.inner_float_tensors(path)
    except ValueError as e:
        raise TargetError(f"{e} Expected a file written by export.to_tflite.") from None
    if floats:
        raise TargetError(
            f"{path!r} is not an integer file: {len(floats)} float tensor(s) between its "
            f"operators (e.g. {floats[0]!r}); an Ethos-U NPU runs int8 (and int16) operators "
            "only, the rest would all fall back to the CPU. Expected a full-integer .tflite: "
            "export.to_tflite(model, path, quantization='int8', io='int8').")


class EthosU:
    """An Arm Ethos-U NPU, through the Vela compiler.

    Args:
        accelerator: one of Vela's accelerator configurations ("ethos-u55-32" ...
            "ethos-u55-256", "ethos-u65-256", "ethos-u65-512", "ethos-u85-128" ...
            "ethos-u85-2048"). Defaults to "ethos-u55-128".
        system_config: a system configuration of Vela's `vela.ini`. Defaults to Vela's own
            default for the accelerator (Ethos_U55_High_End_Embedded, Ethos_U65_Client_Server,
            Ethos_U85_SYS_DRAM_Mid).
        memory_mode: a memory mode of `vela.ini`. Defaults to Vela's (Shared_Sram for U55,
            Dedicated_Sram_384KB for U65 and U85).
        optimise: Vela's scheduling goal, "Performance" or "Size". Defaults to
            "Performance" (Vela's default).
    """

    def __init__(self, accelerator: str = "ethos-u55-128", system_config: Optional[str] = None,
                 memory_mode: Optional[str] = None, optimise: str = "Performance"):
        _, accelerators = _vela()
        known = list(accelerators.member_list())
        if accelerator not in known:
            raise ValueError(f"Unknown Ethos-U `accelerator`. Expected one of {known}. "
                             f"Received: accelerator={accelerator!r}")
        family = accelerator.split("-")[1].upper()  # U55, U65, U85
        systems = _sections("System_Config")
        if system_config is None:
            system_config = {"U85": "Ethos_U85_SYS_DRAM_Mid", "U65": "Ethos_U65_Client_Server"
                             }.get(family, "Ethos_U55_High_End_Embedded")
        fitting = [s for s in systems if f"_{family}_" in s]
        if system_config not in fitting:
            raise ValueError(f"Unknown `system_config` for {accelerator}. Expected one of "
                             f"{fitting} (Vela's vela.ini). Received: "
                             f"system_config={system_config!r}")
        modes = _sections("Memory_Mode")
        if memory_mode is None:
            memory_mode = "Shared_Sram" if family == "U55" else "Dedicated_Sram_384KB"
        if memory_mode not in modes:
            raise ValueError(f"Unknown `memory_mode`. Expected one of {modes} (Vela's vela.ini)."
                             f" Received: memory_mode={memory_mode!r}")
        if optimise not in ("Performance", "Size"):
            raise ValueError("`optimise` must be 'Performance' or 'Size'. Received: "
                             f"optimise={optimise!r}")
        self.accelerator, self.system_config, self.memory_mode = (accelerator, system_config,
                                                                  memory_mode)
        self.optimise = optimise

    @property
    def name(self) -> str:
        return self.accelerator

    def __repr__(self):
        return (f"EthosU({self.accelerator!r}, system_config={self.system_config!r}, "
                f"memory_mode={self.memory_mode!r})")

    def output_dir_for(self, path) -> str:
        stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        return os.path.join(os.path.dirname(os.path.abspath(path)),
                            f"{stem}_vela_{self.accelerator}")

    def measure(self, path, output_dir=None) -> TargetReport:
        """Compiles `path` with Vela for this NPU and returns its figures.

        Args:
            path: a full-integer `.tflite` (`export.to_tflite(..., io="int8")`; a float-I/O
                int8 file works too, its QUANTIZE/DEQUANTIZE listed in `cpu_ops`).
            output_dir: where Vela writes (its `_vela.tflite`, summary, per-layer CSV, debug
                database, log). Defaults to `<stem>_vela_<accelerator>/` beside `path`.
        """
        path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No .tflite file at {path!r}.")
        _integer_file(path)
        out = os.path.abspath(os.fspath(output_dir)) if output_dir else self.output_dir_for(path)
        os.makedirs(out, exist_ok=True)
        vela, _ = _vela()
        argv = [path, "--accelerator-config", self.accelerator, "--config", _config_file(),
                "--system-config", self.system_config, "--memory-mode", self.memory_mode,
                "--optimise", self.optimise, "--output-dir", out, "--verbose-performance",
                "--enable-debug-db"]
        log_path = os.path.join(out, "vela.log")
        try:
            with _output_to(log_path):
                rc = vela.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except Exception as e:  # noqa: BLE001 - Vela's own errors, said with the file
            raise TargetError(f"Vela could not compile {path!r} for {self.accelerator}: "
                              f"{type(e).__name__}: {e}") from e
        with open(log_path, errors="replace") as f:
            log_text = f.read()
        stem = os.path.splitext(os.path.basename(path))[0]
        summary = os.path.join(out, f"{stem}_summary_{self.system_config}.csv")
        if rc != 0 or not os.path.exists(summary):
            tail = "\n".join(log_text.strip().splitlines()[-5:])
            raise TargetError(f"Vela could not compile {path!r} for {self.accelerator} "
                              f"(exit status {rc}): {tail}")
        return self._read(path, out, stem, summary, log_text)

    def _read(self, path, out, stem, summary, log_text) -> TargetReport:
        with open(summary) as f:
            s = next(csv.DictReader(f))
        per_layer = os.path.join(out, f"{stem}_per-layer.csv")
        rows = []
        if os.path.exists(per_layer):
            with open(per_layer) as f:
                rows = list(csv.DictReader(f))
        cpu = collections.Counter(r["Original Operator"] for r in rows if r["Target"] == "CPU")
        m = re.search(r"NPU operators = (\d+)", log_text)
        npu = int(m.group(1)) if m else len({r["Name"] for r in rows if r["Target"] == "NPU"})
        kib = 1024.0
        return TargetReport(
            target=self.accelerator, file=path,
            latency_ms=float(s["inference_time"]) * 1e3,
            weight_bytes=int(float(s["total_npu_encoded_weights"])),
            original_weight_bytes=int(float(s["total_original_weights"])),
            sram_bytes=round(float(s["sram_memory_used"]) * kib),
            flash_bytes=round((float(s["on_chip_flash_memory_used"])
                               + float(s["off_chip_flash_memory_used"])) * kib),
            dram_bytes=round(float(s["dram_memory_used"]) * kib),
            cycles=int(float(s["cycles_total"])), macs=int(float(s["nn_macs"])),
            npu_ops=npu, cpu_ops=dict(cpu), system_config=s["system_config"],
            memory_mode=s["memory_mode"],
            layers=_debug_layers(os.path.join(out, f"{stem}_debug.xml"))
            + [LayerCost(name=r["Name"], operator=r["Original Operator"], placement="CPU")
               for r in rows if r["Target"] == "CPU"],
            compiled=os.path.join(out, f"{stem}_vela.tflite"), output_dir=out)


@contextlib.contextmanager
def _output_to(path):
    """Everything written to stdout and stderr, by Python or by Vela's C++ core (which writes
    to the file descriptors), goes to `path` (Vela's log, kept in its output folder)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _debug_layers(path) -> List[LayerCost]:
    """Per NPU operator, from Vela's debug database: the `perf` table (cycles, MACs) joined
    with `perf_debug` (encoded weight and scale bytes, distinct and zero weights); an
    activation Vela fused into the operator before it (a zero-cycle row) is left out."""
    if not os.path.exists(path):
        return []
    tables = {}
    for t in ElementTree.parse(path).getroot().iter("table"):
        tables[t.get("name")] = list(csv.DictReader(io.StringIO((t.text or "").strip())))
    debug = {r["id"]: r for r in tables.get("perf_debug", [])}

    def num(v):
        return int(float(v)) if v not in (None, "") else None

    out = []
    for r in tables.get("perf", []):
        d = debug.get(r["id"], {})
        cycles, weights = num(r.get("op_cycles")) or 0, num(d.get("weight_total_bytes"))
        if cycles == 0 and weights is None:
            continue
        out.append(LayerCost(name=r["name"], operator=r["operator"], placement="NPU",
                             cycles=cycles, macs=num(r.get("mac_count")) or 0,
                             weight_bytes=weights, scale_bytes=num(d.get("scales_total_bytes")),
                             distinct_weights=num(d.get("weight_distinct")),
                             zero_weights=num(d.get("weight_zero"))))
    return out


class LiteRTCPU:
    """LiteRT on this machine's CPU: the median latency of one inference (`export.latency_ms`,
    batch 1) and the weights as the `.tflite` stores them.

    Args:
        threads: LiteRT CPU threads. Defaults to 1 (what a small device has).
        runs: measured inferences. Defaults to 50.
    """

    def __init__(self, threads: int = 1, runs: int = 50):
        for name, v in (("threads", threads), ("runs", runs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int. Received: {name}={v!r}")
        self.threads, self.runs = threads, runs

    @property
    def name(self) -> str:
        return f"litert-cpu-{self.threads}-thread{'s' if self.threads > 1 else ''}"

    def __repr__(self):
        return f"LiteRTCPU(threads={self.threads})"

    def measure(self, path, sample=None) -> TargetReport:
        """`sample`: one input to time (defaults to zeros of the file's input shape)."""
        path = os.path.abspath(os.fspath(path))
        inputs, _ = export.io_tensors(path)
        if sample is None:
            if len(inputs) != 1:
                raise ValueError(f"{path!r} has {len(inputs)} inputs; LiteRTCPU times one. "
                                 "Expected a single-input model.")
            shape = [max(1, d) for d in next(iter(inputs.values())).shape]
            sample = np.zeros(shape, np.float32)
        weights = export.read_weights(path)
        stored = sum(int(w.nbytes) for w in weights.values())
        ops = collections.Counter(export.operators(path))
        return TargetReport(target=self.name, file=path,
                            latency_ms=export.latency_ms(path, sample, runs=self.runs,
                                                         num_threads=self.threads),
                            weight_bytes=stored, original_weight_bytes=stored,
                            cpu_ops=dict(ops))


def get(name: str, system_config: Optional[str] = None, memory_mode: Optional[str] = None):
    """A target by name: an Ethos-U accelerator configuration ("ethos-u55-128", with Vela's
    `system_config` and `memory_mode`) or "litert-cpu" (the CLI's `--target`)."""
    if isinstance(name, str) and name.startswith("ethos-u"):
        return EthosU(name, system_config=system_config, memory_mode=memory_mode)
    if name in ("litert-cpu", "cpu"):
        if system_config or memory_mode:
            raise ValueError(f"system_config and memory_mode are Vela's; target {name!r} is "
                             "not an Ethos-U.")
        return LiteRTCPU()
    _, accelerators = _vela()
    raise ValueError(f"Unknown target {name!r}. Expected 'litert-cpu' or an Ethos-U "
                     f"accelerator: {list(accelerators.member_list())}.")
