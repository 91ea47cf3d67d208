"""Phase objects: validated, serializable descriptions of one training segment.

A phase says *what* a segment of `collaborative_fit` does (train, prune,
cluster, quantize) and for how many epochs; `plan.resolve` decides how phases
combine (which earlier work each one preserves). Phases know nothing of tfmot.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

LayerSelector = Union[None, Sequence[str], Callable]

_PRUNE_SCHEDULES = ("polynomial", "constant")
_CLUSTER_INITS = ("kmeans++", "linear", "density", "random")
_QUANTIZE_PRESERVE = ("auto", "none", "sparsity", "clusters", "sparsity+clusters")
_DECAYS = (None, "cosine")


def _fail(what: str, expected: str, fix: str, **received) -> None:
    got = ", ".join(f"{k}={v!r}" for k, v in received.items())
    raise ValueError(f"{what}. Expected {expected}. {fix} Received: {got}")


def _check_epochs(cls: str, epochs) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        _fail(f"{cls}: `epochs` must be a positive integer",
              "an int >= 1", f"Give the number of epochs this phase trains, e.g. {cls}(epochs=2).",
              epochs=epochs)


def _check_learning_rate(cls: str, learning_rate) -> None:
    if learning_rate is None:
        return
    ok = isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool)
    if ok:
        try:
            ok = 0 < float(learning_rate) < math.inf
        except OverflowError:  # an int beyond float range
            ok = False
    if not ok:
        _fail(f"{cls}: `learning_rate` must be a positive, finite number or None",
              "a finite float > 0, or None to keep the compiled optimizer's learning rate",
              "Pass e.g. learning_rate=1e-4.", learning_rate=learning_rate)


def _check_decay(cls: str, decay) -> None:
    if not any(decay is d or (isinstance(decay, str) and decay == d) for d in _DECAYS):
        _fail(f"{cls}: unknown `decay`", f"one of {_DECAYS}",
              "Pass decay='cosine' to decay the phase's rate to 0 over its steps, or leave it "
              "at None for a constant rate.", decay=decay)


@dataclasses.dataclass(frozen=True)
class CosineDecay:
    """A phase's learning rate that starts at `initial` and follows a cosine to 0 over the
    phase's `steps` (counted by the phase's fresh optimizer, so a resumed phase continues
    where it stopped). Engines build their Keras' `CosineDecay` from it."""

    initial: float
    steps: int


def _check_layers(cls: str, layers) -> None:
    if layers is None or callable(layers):
        return
    if isinstance(layers, str):
        _fail(f"{cls}: `layers` must be a list of layer names, not a single string",
              "None, a list of layer names, or a predicate `layer -> bool`",
              f"Wrap the name in a list: layers=[{layers!r}].", layers=layers)
    try:
        names = list(layers)
    except TypeError:
        names = None
    if names is None or not names or not all(isinstance(n, str) for n in names):
        _fail(f"{cls}: `layers` must select at least one layer",
              "None (every supported layer), a non-empty list of layer names, or a "
              "predicate `layer -> bool`", "Pass e.g. layers=['dense_1'].", layers=layers)


# With learning_rate=None a compression phase trains at the rate its policy picks
# (keras_colopt.finetune: a short probe around the compiled rate, by default); a Train phase at
# the compiled rate. History: a tenth of the compiled rate for Cluster and Quantize until
# 2026-12-01, the compiled rate for every phase until 2026-12-06 (it threw models trained with
# a decaying schedule out of their basin: benchmarks/results/finetune_heldout.md).


def polynomial_sparsity(initial, final, progress):
    """The sparsity of a polynomial pruning ramp at `progress` (0 to 1) through it: tfmot's
    `PolynomialDecay` (power 3), for floats, arrays and backend tensors alike. The one
    formula of the schedule: the Keras 3 engine's masks follow it in-graph, the tfmot engine
    builds tfmot's `PolynomialDecay` from the same `Prune.ramp` (a test compares the two at
    every step)."""
    return final + (initial - final) * (1.0 - progress) ** 3


class Phase:
    """Base class of every phase. Subclasses define `kind` and their arguments.

    Every phase also takes `decay`: `None` (the phase trains at one rate, the default) or
    `"cosine"` (its rate, `learning_rate` or the default, decays along a cosine to 0 over
    the phase's steps; `phases.CosineDecay`).
    """

    kind = "phase"

    def __init__(self, epochs, learning_rate=None, layers: LayerSelector = None, decay=None):
        name = type(self).__name__
        _check_epochs(name, epochs)
        _check_learning_rate(name, learning_rate)
        _check_layers(name, layers)
        _check_decay(name, decay)
        self.decay = decay
        self.epochs = int(epochs)
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.layers = list(layers) if (layers is not None and not callable(layers)) else layers

    def get_config(self) -> dict:
        """Returns exactly the constructor's keyword arguments."""
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "layers": self.layers,
                "decay": self.decay}

    def schedule_for(self, compiled, steps_per_epoch: int):
        """What this phase's fresh optimizer trains at: `rate_for(compiled)` (a constant, or
        `None` to keep a compiled schedule), or with `decay="cosine"` a `CosineDecay` from
        that rate to 0 over the phase's steps. A cosine needs a number to start from: with a
        compiled schedule and no `learning_rate`, it raises (before training)."""
        rate = self.rate_for(compiled)
        if self.decay is None:
            return rate
        if rate is None:
            raise ValueError(
                f"{type(self).__name__}: decay='cosine' needs a starting rate, and the model "
                "was compiled with a learning-rate schedule. Expected a constant compiled "
                f"rate, or the phase's own learning_rate. Pass e.g. "
                f"{type(self).__name__}(..., learning_rate=1e-4, decay='cosine'), or leave "
                "decay at None to keep the compiled schedule.")
        return CosineDecay(rate, max(1, self.epochs * int(steps_per_epoch)))

    def rate_for(self, compiled) -> Optional[float]:
        """The learning rate this phase trains at, given the rate its policy picked
        (`finetune.choose`: the compiled rate, or what the probe chose).

        `learning_rate` when given; otherwise `compiled`. `None` (keep the compiled
        optimizer's) when `compiled` is a schedule, not a number.

        Example:
            >>> Quantize(epochs=1).rate_for(1e-3)
            0.001
            >>> Quantize(epochs=1, learning_rate=1e-4).rate_for(1e-3)
            0.0001
        """
        if self.learning_rate is not None:
            return self.learning_rate
        if isinstance(compiled, numbers.Real) and not isinstance(compiled, bool):
            return float(compiled)
        return None

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={_arg_repr(v)}" for k, v in self.get_config().items()
                         if v is not None)
        return f"{type(self).__name__}({args})"


def _arg_repr(value) -> str:
    """repr of a config value; objects without a repr of their own (a QuantizeConfig) show
    their class, not an address, in plan logs."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_arg_repr(v)}" for k, v in value.items()) + "}"
    if type(value).__repr__ is object.__repr__:
        return f"<{type(value).__name__}>"
    return repr(value)


class Train(Phase):
    """Plain training: no compression. Usually the first phase (the baseline).

    Args:
        epochs: number of epochs. Must be >= 1.
        learning_rate: overrides the compiled optimizer's learning rate for
            this phase. Defaults to `None` (keep it).

    Example:
        >>> Train(epochs=5)
        Train(epochs=5)
    """

    kind = "train"

    def __init__(self, epochs, learning_rate=None, decay=None):
        super().__init__(epochs, learning_rate=learning_rate, decay=decay)

    def get_config(self):
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "decay": self.decay}


class Prune(Phase):
    """Magnitude pruning to a target sparsity.

    The sparsity follows `schedule` from `initial_sparsity` to `sparsity` over
    the phase's first `max(1, epochs - 1)` epochs (steps derived from the
    number of steps per epoch); the last epoch, when there are two or more,
    fine-tunes at the target sparsity so accuracy can recover.

    Args:
        sparsity: target fraction of zero weights in each pruned kernel, in
            [0, 1). Defaults to `0.5`.
        epochs: number of epochs. Must be >= 1.
        schedule: `"polynomial"` (cubic ramp, tfmot's PolynomialDecay) or
            `"constant"` (the target from the first step). Defaults to
            `"polynomial"`.
        initial_sparsity: sparsity at the start of a polynomial ramp.
            Defaults to `0.0`.
        m_by_n: structured sparsity `(m, n)`: keep at most `m` of every `n`
            consecutive weights, e.g. `(2, 4)`. Then `sparsity` must equal
            `1 - m/n` (the default 0.5 matches 2:4). Defaults to `None`.
        learning_rate: per-phase learning rate. Defaults to `None`: the rate
            the run's `rate_policy` picks (a short probe around the compiled rate).
        layers: names of the layers to prune, or a predicate `layer -> bool`.
            Defaults to `None` (every layer that can be pruned).

    Example:
        >>> Prune(sparsity=0.5, epochs=3)
        Prune(sparsity=0.5, epochs=3, schedule='polynomial', initial_sparsity=0.0)
    """

    kind = "prune"

    def __init__(self, sparsity=0.5, epochs=None, schedule="polynomial", initial_sparsity=0.0,
                 m_by_n=None, learning_rate=None, layers=None, decay=None):
        super().__init__(epochs, learning_rate=learning_rate, layers=layers, decay=decay)
        if (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)
                or not 0.0 <= sparsity < 1.0):
            _fail("Prune: `sparsity` must be in [0, 1)", "a float with 0 <= sparsity < 1",
                  "A sparsity of 0.5 zeroes half of each pruned kernel; 1.0 would zero all of it.",
                  sparsity=sparsity)
        if schedule not in _PRUNE_SCHEDULES:
            _fail("Prune: unknown `schedule`", f"one of {_PRUNE_SCHEDULES}",
                  "Use 'polynomial' to ramp up or 'constant' to prune at once.", schedule=schedule)
        if (isinstance(initial_sparsity, bool) or not isinstance(initial_sparsity, numbers.Real)
                or not 0.0 <= initial_sparsity <= sparsity):
            _fail("Prune: `initial_sparsity` must be in [0, sparsity]",
                  f"a float with 0 <= initial_sparsity <= sparsity={sparsity}",
                  "Lower initial_sparsity or raise sparsity.", initial_sparsity=initial_sparsity)
        if m_by_n is not None:
            ok = (isinstance(m_by_n, (tuple, list)) and len(m_by_n) == 2
                  and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in m_by_n)
                  and 0 < m_by_n[0] < m_by_n[1])
            if not ok:
                _fail("Prune: `m_by_n` must be a pair (m, n) of integers with 0 < m < n",
                      "e.g. (2, 4): keep 2 of every 4 weights", "Pass m_by_n=(2, 4).", m_by_n=m_by_n)
            m_by_n = (int(m_by_n[0]), int(m_by_n[1]))
            implied = 1.0 - m_by_n[0] / m_by_n[1]
            if abs(implied - sparsity) > 1e-9:
                _fail("Prune: `sparsity` contradicts `m_by_n`",
                      f"sparsity == 1 - m/n = {implied:g} for m_by_n={m_by_n}",
                      f"Pass sparsity={implied:g} (or leave m_by_n out).",
                      sparsity=sparsity, m_by_n=m_by_n)
        self.sparsity = float(sparsity)
        self.schedule = schedule
        self.initial_sparsity = float(initial_sparsity)
        self.m_by_n = m_by_n

    def ramp(self, steps_per_epoch: int):
        """`(end_step, frequency)` of the schedule at `steps_per_epoch` steps per epoch.

        The ramp covers the first `max(1, epochs - 1)` epochs; the mask is updated every
        `frequency` steps (about ten times over the ramp), and the ramp ends on an update
        step, so that the target is reached exactly.
        """
        ramp_steps = max(1, max(1, self.epochs - 1) * steps_per_epoch)
        frequency = max(1, ramp_steps // 10)
        return (ramp_steps // frequency) * frequency, frequency

    def get_config(self):
        return {"sparsity": self.sparsity, "epochs": self.epochs, "schedule": self.schedule,
                "initial_sparsity": self.initial_sparsity, "m_by_n": self.m_by_n,
                "learning_rate": self.learning_rate, "layers": self.layers, "decay": self.decay}


class Cluster(Phase):
    """Weight clustering (weight sharing) to `clusters` unique values per kernel.

    Args:
        clusters: number of cluster centroids per kernel (per output channel
            when `per_channel`). Must be >= 2; >= 3 when sparsity is
            preserved, since zero takes one of them.
        epochs: number of epochs. Must be >= 1.
        init: centroid initialization, one of `"kmeans++"`, `"linear"`,
            `"density"`, `"random"`. Defaults to `"kmeans++"`. On Keras 3,
            `"kmeans++"` gives the optimal 1-D k-means centroids of each
            kernel (or channel): the least within-cluster sum of squares,
            which k-means++ seeding with Lloyd iterations only approaches
            (`keras_colopt.kmeans.kmeans_1d`); on tf_keras it is tfmot's
            k-means++. `"linear"`: equally spaced between the smallest and
            the largest weight; `"density"`: equally spaced in their
            cumulative distribution; `"random"`: uniform between the two.
        per_channel: cluster each Conv2D output channel separately.
            Dense layers are always clustered per tensor. Defaults to `False`.
        preserve_sparsity: `"auto"` (preserve when a Prune phase comes
            before), `True` or `False`. Defaults to `"auto"`.
        learning_rate: per-phase learning rate. Defaults to `None`: the rate
            the run's `rate_policy` picks (a short probe around the compiled
            rate; a compiled schedule is kept as it is).
        layers: names of the layers to cluster, or a predicate. Defaults to
            `None` (every layer that can be clustered).

    Example:
        >>> Cluster(clusters=8, epochs=2)
        Cluster(clusters=8, epochs=2, init='kmeans++', per_channel=False, preserve_sparsity='auto')
    """

    kind = "cluster"

    def __init__(self, clusters=8, epochs=None, init="kmeans++", per_channel=False,
                 preserve_sparsity="auto", learning_rate=None, layers=None, decay=None):
        super().__init__(epochs, learning_rate=learning_rate, layers=layers, decay=decay)
        if isinstance(clusters, bool) or not isinstance(clusters, numbers.Integral) or clusters < 2:
            _fail("Cluster: `clusters` must be an integer >= 2",
                  "an int >= 2 (>= 3 when sparsity is preserved, zero being one cluster)",
                  "Pass e.g. clusters=8.", clusters=clusters)
        if init not in _CLUSTER_INITS:
            _fail("Cluster: unknown `init`", f"one of {_CLUSTER_INITS}",
                  "'kmeans++' is the usual choice.", init=init)
        if not isinstance(per_channel, bool):
            _fail("Cluster: `per_channel` must be a bool", "True or False",
                  "Pass per_channel=True to cluster each Conv2D output channel separately.",
                  per_channel=per_channel)
        if preserve_sparsity not in ("auto", True, False) or (
                not isinstance(preserve_sparsity, (bool, str))):
            _fail("Cluster: `preserve_sparsity` must be 'auto', True or False",
                  "'auto' (preserve when a Prune phase comes before), True, or False",
                  "Leave it at 'auto' unless you want to override the phase order.",
                  preserve_sparsity=preserve_sparsity)
        self.clusters = int(clusters)
        self.init = init
        self.per_channel = per_channel
        self.preserve_sparsity = preserve_sparsity

    def get_config(self):
        return {"clusters": self.clusters, "epochs": self.epochs, "init": self.init,
                "per_channel": self.per_channel, "preserve_sparsity": self.preserve_sparsity,
                "learning_rate": self.learning_rate, "layers": self.layers, "decay": self.decay}


class Quantize(Phase):
    """Quantization-aware training (8-bit, tfmot's default scheme).

    Preservation of earlier phases' work: after Prune it is PQAT, after
    Cluster CQAT, after both PCQAT.

    Args:
        epochs: number of epochs. Must be >= 1.
        preserve: `"auto"` (from the phase order), `"none"` (plain QAT),
            `"sparsity"` (PQAT), `"clusters"` (CQAT) or `"sparsity+clusters"`
            (PCQAT). Defaults to `"auto"`.
        learning_rate: per-phase learning rate. Defaults to `None`: the rate
            the run's `rate_policy` picks (a short probe around the compiled
            rate; a compiled schedule is kept as it is).
        layers: names of the layers to quantize-annotate, or a predicate.
            Defaults to `None` (the whole model).
        quantize_configs: `{layer name: QuantizeConfig instance}`: how to
            quantize layers tfmot's 8-bit scheme does not know (a custom layer,
            a `Lambda`), or to override its choice for a layer; each is given
            to tfmot's `quantize_annotate_layer(layer, quantize_config=...)`.
            The names are checked against the model before training. These
            objects cannot go in a recipe file. A config that references
            custom classes of its own gets them through
            `collaborative_fit(custom_objects=...)`. Defaults to `None`.

    Example:
        >>> Quantize(epochs=2)
        Quantize(epochs=2, preserve='auto')
        >>> Quantize(epochs=2, quantize_configs={"scaled": MyQuantizeConfig()})
        Quantize(epochs=2, preserve='auto', quantize_configs={'scaled': <MyQuantizeConfig>})
    """

    kind = "quantize"

    def __init__(self, epochs=None, preserve="auto", learning_rate=None, layers=None,
                 quantize_configs=None, decay=None):
        super().__init__(epochs, learning_rate=learning_rate, layers=layers, decay=decay)
        if preserve not in _QUANTIZE_PRESERVE:
            _fail("Quantize: unknown `preserve`", f"one of {_QUANTIZE_PRESERVE}",
                  "Leave it at 'auto' to follow the phase order.", preserve=preserve)
        self.preserve = preserve
        self.quantize_configs = _check_quantize_configs(quantize_configs)

    def get_config(self):
        return {"epochs": self.epochs, "preserve": self.preserve,
                "learning_rate": self.learning_rate, "layers": self.layers,
                "quantize_configs": self.quantize_configs, "decay": self.decay}


_PLAIN_DATA = (str, bytes, numbers.Number, list, tuple, dict, set)


def _check_quantize_configs(configs) -> Optional[dict]:
    """`quantize_configs` as a new dict, or a ValueError. Phases know no tfmot: the values are
    checked to be objects here (not plain data, as a recipe file would give, nor a class
    instead of an instance); whether they are QuantizeConfigs, and the layer names, are
    checked against the model before training (the engine's preflight)."""
    if configs is None:
        return None
    fix = ("Pass one QuantizeConfig instance per layer name, e.g. "
           "quantize_configs={'scaled_dense': ScaledDenseQuantizeConfig()}.")
    if not isinstance(configs, Mapping) or not configs:
        _fail("Quantize: `quantize_configs` must be a non-empty mapping of layer names to "
              "quantize configs", "a dict {layer name: QuantizeConfig instance}, or None",
              fix, quantize_configs=configs)
    for name, config in configs.items():
        if not isinstance(name, str) or not name:
            _fail("Quantize: every key of `quantize_configs` must be a layer name",
                  "non-empty strings", fix, quantize_configs=configs)
        if config is None or isinstance(config, (_PLAIN_DATA, type)):
            what = ("a class, not an instance" if isinstance(config, type) else
                    "plain data, not a QuantizeConfig object (a recipe file cannot hold one: "
                    "give it in Python)")
            _fail(f"Quantize: quantize_configs[{name!r}] is {what}",
                  "a tfmot.quantization.keras.QuantizeConfig instance", fix,
                  quantize_configs=configs)
    return dict(configs)


PHASE_CLASSES = {cls.__name__: cls for cls in (Train, Prune, Cluster, Quantize)}
