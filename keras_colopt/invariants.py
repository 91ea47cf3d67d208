"""What must hold after each phase, checked on the weights a model really uses.

`check_model` compares every layer's effective kernels (see
`engines.tfmot.kernels`) with its expectation: at least its target sparsity,
at most its number of clusters (per output channel when clustering or the
weight quantizer is per channel).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np

from keras_colopt import stats


class InvariantViolation(RuntimeError):
    """A compression invariant broke during training.

    Attributes:
        violations: list of `Violation`, one per broken layer/invariant.
        model: the model as it was when the violation was found (for inspection).
            Raised by `collaborative_fit`, the error also carries `result` (the last
            good model and its history): that model, when it is this one, is restored
            to its last good weights, and the weights at the violation are kept in
            `model_at_error_weights`.
    """

    def __init__(self, violations, model=None):
        self.violations = list(violations)
        self.model = model
        lines = "\n".join("  - " + v.message() for v in self.violations)
        super().__init__(
            f"{len(self.violations)} compression invariant(s) broken:\n{lines}\n"
            "The phase's preservation did not hold for these layers. Check the log lines "
            "about layers tfmot cannot touch, and the layer types (DESIGN.md lists the known "
            "silent tfmot failures).")


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What one layer must satisfy.

    Attributes:
        sparsity: minimal fraction of zeros over the layer's kernels, or None.
        clusters: maximal number of unique kernel values, or None.
        per_channel: count `clusters` per output channel instead of per tensor.
    """

    sparsity: Optional[float] = None
    clusters: Optional[int] = None
    per_channel: bool = False


@dataclasses.dataclass(frozen=True)
class Violation:
    layer: str
    invariant: str  # "sparsity" | "clusters" | "kernel"
    expected: str
    found: str
    phase: Optional[str] = None
    epoch: Optional[int] = None

    def message(self) -> str:
        where = f"layer '{self.layer}'"
        if self.phase is not None:
            where += f", phase {self.phase}"
        if self.epoch is not None:
            where += f", epoch {self.epoch}"
        return f"{where}: {self.invariant} expected {self.expected}, found {self.found}"


def check_layer(name: str, kernels, expectation: Expectation, tolerance: float = 0.005,
                phase=None, epoch=None, parts=None) -> List[Violation]:
    """Checks one layer's effective kernels against its expectation.

    Args:
        name: the layer's name, for the messages.
        kernels: `[(weight_name, array, channel_axis)]` as returned by an
            engine's `kernels(layer)`.
        expectation: an `Expectation`.
        tolerance: how far below the target sparsity a layer may be (absolute,
            e.g. 0.005 = half a percentage point), on top of one weight of
            rounding.
        parts: the kernels' `stats.kernel_stats(kernels)`, when already computed (a
            callback's per-epoch statistics): the counts are read from them instead of
            being counted again.

    Returns:
        A list of `Violation` (empty when everything holds).
    """
    out = []
    if not kernels:
        if expectation.sparsity is not None or expectation.clusters is not None:
            out.append(Violation(name, "kernel", "a kernel the layer computes with",
                                 "none (the layer is not wrapped for preservation)", phase, epoch))
        return out
    if parts is None:
        parts = stats.kernel_stats(kernels)
    if expectation.sparsity is not None:
        zeros, size = sum(p.zeros for p in parts), sum(p.size for p in parts)
        found = zeros / size if size else 0.0
        if found < expectation.sparsity - tolerance - 1.0 / max(size, 1):
            out.append(Violation(name, "sparsity", f">= {expectation.sparsity:.4f}",
                                 f"{found:.4f} ({zeros}/{size} zeros)", phase, epoch))
    if expectation.clusters is not None:
        for (wname, w, axis), p in zip(kernels, parts):
            if expectation.per_channel and p.unique_per_channel_max is not None:
                found = p.unique_per_channel_max
                if found > expectation.clusters:  # which channel, for the message
                    per = stats.unique_values(np.asarray(w), axis=axis)
                    where = f" in channel {int(per.argmax())} of {wname}"
            else:
                found, where = p.unique, f" in {wname}"
            if found > expectation.clusters:
                unit = "per channel" if expectation.per_channel else "per tensor"
                out.append(Violation(name, "clusters",
                                     f"<= {expectation.clusters} unique values {unit}",
                                     f"{found}{where}", phase, epoch))
    return out
