"""The fine-tuning rate of a compression phase: a short probe, not the compiled rate.

A compression phase (Prune, Cluster, Quantize) fine-tunes a model someone already trained.
The rate it was compiled with says little about the rate it can take: a model trained to the
bottom of a decaying schedule and compiled again at Keras' default `Adam(1e-3)` is thrown out
of its basin by that rate (a MobileNet v1 lost 23 points of PCQAT accuracy so), while a model
trained at a constant 1e-3 fine-tunes best near it. Nothing in the weights or the fresh
optimizer tells the two apart; a few steps on the data do.

`RateProbe` (the default policy, `when`) decides the rate of each compression phase that
has no `learning_rate` of its own: right after the phase is applied, on the phase's own
model, it trains `steps` batches at each candidate rate (the compiled rate times each of
`factors`), each time from the same weights and a fresh optimizer state, and measures the
loss on `eval_batches` other batches. It keeps the largest rate whose loss is within
`tolerance` (20 %) of the best one (a larger rate recovers more in the phase's epochs; one that
raises the loss is out). The weights are then put back as they were, the optimizer's state is
reset as a fresh one's, and the phase trains at that rate. `probe_rates` (`what`) is the measurement itself.

`rate_policy="compiled"` keeps the compiled rate for every phase (the default from 2026-12-01
to 2026-12-06), and a phase's own `learning_rate=` always wins. Where no probe can run (the
drop-in callback without `probe_data`, a generator, a distribution strategy, unlabelled
data), a phase trains at `FALLBACK_FRACTION` of the compiled rate (1: the compiled rate),
and the log says so.
How the policy was chosen: `benchmarks/finetune_heldout.py` and README Results.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import List, Optional, Sequence

import numpy as np

from keras_colopt.phases import CosineDecay

log = logging.getLogger("keras_colopt")

# Where no probe can run: the fixed fraction of the compiled rate with the smallest largest
# distance to a pair's best on the choice pairs of benchmarks/results/finetune_heldout.md
# (the compiled rate 0.20 point, a tenth of it 0.83; held out, a tenth was the worst policy on
# every pair, 13.7 points below the compiled rate on a decay-trained MobileNet).
FALLBACK_FRACTION = 1.0


@dataclasses.dataclass(frozen=True)
class RateChoice:
    """What a phase trains at, and why (the phase's log line says it).

    Attributes:
        rate: the learning rate, or None to keep a compiled schedule.
        why: a short reason ("probed", "as compiled", ...).
        losses: `{rate: probe loss}` when a probe ran, else None.
    """

    rate: Optional[float]
    why: str
    losses: Optional[dict] = None

    def text(self) -> str:
        if self.rate is None:
            return f"as compiled (a schedule; {self.why})"
        if not self.losses:
            return f"{self.rate:g} ({self.why})"
        tried = ", ".join(f"{r:.3g}: {loss:.4g}" for r, loss in sorted(self.losses.items(),
                                                                      reverse=True))
        return f"{self.rate:g} ({self.why}; probe loss by rate {tried})"


class RateProbe:
    """The default fine-tuning policy of compression phases: a short learning-rate probe.

    Args:
        factors: the candidate rates, as multiples of the compiled rate. Defaults to
            `(1.0, 0.3, 0.1, 0.03, 0.01)`.
        steps: training batches per candidate. Defaults to `16`.
        eval_batches: batches (not trained on) the candidates' losses are measured on.
            Defaults to `8`.
        tolerance: a candidate within this fraction of the best loss counts as good as
            the best; the largest such rate is chosen. Defaults to `0.2` (chosen against
            0.05 and fixed rates in `benchmarks/results/finetune_heldout.md`).
        seed: which training rows the probe uses (arrays). Defaults to `0`.

    Example:
        >>> RateProbe(steps=16).get_config()["steps"]
        16
    """

    def __init__(self, factors=(1.0, 0.3, 0.1, 0.03, 0.01), steps=16, eval_batches=8,
                 tolerance=0.2, seed=0):
        try:
            fs = [float(f) for f in factors]
        except (TypeError, ValueError):
            fs = []
        if not fs or any(not (0 < f < math.inf) for f in fs):
            raise ValueError("RateProbe: `factors` must be positive multiples of the compiled "
                             "rate. Expected e.g. factors=(1.0, 0.3, 0.1). Received: "
                             f"factors={factors!r}")
        for name, value in (("steps", steps), ("eval_batches", eval_batches)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"RateProbe: `{name}` must be an int >= 1. Received: "
                                 f"{name}={value!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not (
                0 <= tolerance < 1):
            raise ValueError("RateProbe: `tolerance` must be in [0, 1), a fraction of the best "
                             f"probe loss. Received: tolerance={tolerance!r}")
        self.factors = tuple(sorted(set(fs), reverse=True))
        self.steps, self.eval_batches = int(steps), int(eval_batches)
        self.tolerance, self.seed = float(tolerance), int(seed)

    def get_config(self) -> dict:
        return {"factors": list(self.factors), "steps": self.steps,
                "eval_batches": self.eval_batches, "tolerance": self.tolerance,
                "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(other) is RateProbe and self.get_config() == other.get_config()

    def __repr__(self):
        return "RateProbe(" + ", ".join(f"{k}={v!r}" for k, v in self.get_config().items()) + ")"

    def choose(self, losses: dict) -> float:
        """The largest rate whose loss is within `tolerance` of the best (finite) loss."""
        finite = {r: v for r, v in losses.items() if math.isfinite(v)}
        if not finite:
            return min(losses)
        best = min(finite.values())
        return max(r for r, v in finite.items() if v <= best + self.tolerance * abs(best))


def resolve_policy(policy):
    """`None` -> the default `RateProbe()`; "compiled"; a `RateProbe`; anything else raises."""
    if policy is None:
        return RateProbe()
    if isinstance(policy, RateProbe) or (isinstance(policy, str) and policy == "compiled"):
        return policy
    raise ValueError("`rate_policy` must be None (the default: a short learning-rate probe at "
                     "each compression phase), a keras_colopt.RateProbe(...), or 'compiled' "
                     "(every phase at the compiled rate). Received: "
                     f"rate_policy={policy!r}")


# --------------------------------------------------------------------------- data

class ProbeData:
    """The batches a probe trains and measures on: fixed once, the same for every
    candidate and every phase of a run. `train` and `eval` are lists of (x, y)."""

    def __init__(self, train: List[tuple], eval: List[tuple]):
        self.train, self.eval = train, eval


def probe_data(x, y, batch_size, probe: RateProbe) -> (Optional[ProbeData], str):
    """The probe's batches from a fit's training data, or (None, why not).

    Arrays (or lists/dicts of them) give a fixed random subset of rows; a finite or
    repeated `tf.data.Dataset` gives its first batches, read once."""
    need = probe.steps + probe.eval_batches
    if _is_dataset(x):
        batches = []
        for item in x.take(need):
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                return None, "the dataset yields no labels"
            batches.append((item[0], item[1]))
        if len(batches) < 2:
            return None, "the dataset has fewer than two batches"
        k = max(1, min(probe.steps, len(batches) - 1))
        return ProbeData(batches[:k], batches[k:]), ""
    if y is None:
        return None, "no labels (y=None)"
    rows = _rows(x)
    if rows is None or _rows(y) != rows:
        return None, "the training data is not arrays with one row per example"
    bs = int(batch_size or 32)
    if rows < 2 * bs:
        bs = max(1, rows // 2)
    order = np.random.default_rng(probe.seed).permutation(rows)
    n_batches = min(need, rows // bs)
    k = max(1, min(probe.steps, n_batches - 1))
    batches = [(_take(x, order[i * bs:(i + 1) * bs]), _take(y, order[i * bs:(i + 1) * bs]))
               for i in range(n_batches)]
    return ProbeData(batches[:k], batches[k:]), ""


def _is_dataset(x) -> bool:
    return type(x).__name__.endswith("Dataset") and hasattr(x, "take")


def _rows(x) -> Optional[int]:
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        sizes = {_rows(v) for v in x}
        return sizes.pop() if len(sizes) == 1 else None
    shape = getattr(x, "shape", None)
    if shape is None or not len(shape):
        return None
    return int(shape[0])


def _take(x, idx):
    if isinstance(x, dict):
        return {k: _take(v, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, idx) for v in x)
    return np.asarray(x)[idx]


# --------------------------------------------------------------------------- the probe

def probe_rates(model, data: ProbeData, rates: Sequence[float], companions=()) -> dict:
    """`{rate: loss}`: for each rate, the model trained `len(data.train)` batches from its
    current weights with its optimizer reset, then its mean loss on `data.eval`.

    The model must be compiled (its optimizer's learning rate a variable). Afterwards its
    weights are put back, its optimizer's rate too, and the optimizer's state is zeroed (as a
    fresh optimizer's); `companions` (callbacks a phase needs while training, e.g. tfmot's
    UpdatePruningStep) see the probe's batches.
    """
    weights = model.get_weights()
    opt = model.optimizer
    lr = opt.learning_rate
    initial = float(lr.numpy() if hasattr(lr, "numpy") else np.asarray(lr))
    losses = {}
    try:
        for rate in rates:
            model.set_weights(weights)
            _reset(opt, rate)
            for cb in companions:
                cb.set_model(model)
                cb.on_train_begin()
            for i, (xb, yb) in enumerate(data.train):
                for cb in companions:
                    cb.on_train_batch_begin(i)
                model.train_on_batch(xb, yb)
                for cb in companions:
                    cb.on_train_batch_end(i)
            values = [_loss(model.test_on_batch(xb, yb, return_dict=True))
                      for xb, yb in data.eval]
            losses[float(rate)] = float(np.mean(values)) if values else float("nan")
    finally:
        model.set_weights(weights)
        _reset(opt, initial)
    return losses


def _loss(result) -> float:
    value = result.get("loss") if isinstance(result, dict) else result
    return float(np.asarray(value).reshape(-1)[0])


def _reset(opt, rate: float) -> None:
    """Zeroes the optimizer's state (moments, step count) and sets its rate."""
    lr = getattr(opt, "learning_rate", None)
    if not hasattr(lr, "assign"):
        raise ValueError("the optimizer's learning rate is not a variable")
    variables = opt.variables
    for v in (variables() if callable(variables) else variables):
        dtype = getattr(v.dtype, "as_numpy_dtype", v.dtype)
        v.assign(np.zeros(tuple(v.shape), dtype=dtype))
    lr.assign(rate)


@dataclasses.dataclass(frozen=True)
class PhaseRate:
    """A phase's rate: what its optimizer is built with, the log line's text, and the rate
    the policy chose (None: the compiled one), which a checkpoint keeps for a resume."""

    schedule: object
    text: str
    chosen: Optional[float] = None

    def __str__(self):
        return self.text


def phase_schedule(phase, choice: RateChoice, compiled, steps_per_epoch: int) -> PhaseRate:
    """What a phase's optimizer is built with, from its `RateChoice`: the chosen rate (or the
    compiled one, a schedule included), through the phase's own `decay`."""
    base = compiled if choice.rate is None else choice.rate
    schedule = phase.schedule_for(base, steps_per_epoch)
    text = choice.text()
    if isinstance(schedule, CosineDecay):
        text += f", decaying along a cosine to 0 over the phase's {schedule.steps} steps"
    return PhaseRate(schedule, text, choice.rate)


def choose(policy, phase, compiled, data, compile_at, model, companions=()) -> RateChoice:
    """The rate one phase trains at (before its `cosine` decay, if any), and why.

    Args:
        policy: `RateProbe` or "compiled" (see `resolve_policy`).
        phase: the phase (its `learning_rate` wins; a Train phase keeps the compiled rate).
        compiled: the compiled optimizer's rate, or None/a schedule object.
        data: a `ProbeData`, or a string saying why there is none.
        compile_at: `rate -> None`, compiles `model` with a fresh optimizer at `rate`.
        model: the phase's model (applied, not yet compiled for the phase).
        companions: callbacks the phase trains with (tfmot's UpdatePruningStep).
    """
    if phase.learning_rate is not None:
        return RateChoice(phase.learning_rate, "the phase's learning_rate")
    if not isinstance(compiled, numbers.Real) or isinstance(compiled, bool):
        return RateChoice(None, "the compiled optimizer's schedule runs on")
    compiled = float(compiled)
    if phase.kind == "train":
        return RateChoice(compiled, "as compiled")
    if not isinstance(policy, RateProbe):
        return RateChoice(compiled, "as compiled: rate_policy='compiled'")
    if not isinstance(data, ProbeData):
        return RateChoice(compiled * FALLBACK_FRACTION,
                          f"{FALLBACK_FRACTION:g} x the compiled {compiled:g}: no rate probe, "
                          f"{data}")
    rates = [compiled * f for f in policy.factors]
    compile_at(rates[0])
    losses = probe_rates(model, data, rates, companions)
    rate = policy.choose(losses)
    return RateChoice(rate, f"probed: {rate / compiled:.3g} x the compiled {compiled:g}",
                      losses)
