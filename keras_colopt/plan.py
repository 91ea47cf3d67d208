"""Resolve a phase list into a plan: epoch ranges, automatic preservation, and
every compatibility check, done once, before any training.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

from keras_colopt.phases import Cluster, Phase, Prune, Quantize, Train


class PlanError(ValueError):
    """A phase list that cannot be run as given (raised before any training)."""


_RANK = {"train": 0, "prune": 1, "cluster": 2, "quantize": 3}


@dataclasses.dataclass(frozen=True)
class PlannedPhase:
    """One phase of a resolved plan.

    Attributes:
        index: position in the phase list.
        phase: the user's phase object (never modified).
        label: a readable name: "Train", "Prune", "Cluster (sparsity-preserving)",
            "PQAT", "CQAT", "PCQAT", "QAT"...
        start_epoch: first epoch (inclusive) on the run's continuous axis.
        end_epoch: last epoch (exclusive).
        preserve_sparsity: whether this phase must keep the zeros made before it.
        preserve_clusters: whether this phase must keep the clusters made before it.
        sparsity: the sparsity every pruned layer must keep during this phase
            (the Prune target), or None.
        clusters: the maximal unique values per clustered kernel, or None.
        per_channel: whether `clusters` counts per output channel.
    """

    index: int
    phase: Phase
    label: str
    start_epoch: int
    end_epoch: int
    preserve_sparsity: bool = False
    preserve_clusters: bool = False
    sparsity: Optional[float] = None
    clusters: Optional[int] = None
    per_channel: bool = False

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved phase list."""

    phases: List[PlannedPhase]

    @property
    def total_epochs(self) -> int:
        return self.phases[-1].end_epoch if self.phases else 0

    def describe(self) -> str:
        lines = []
        for p in self.phases:
            lines.append(f"  [{p.start_epoch:>3}-{p.end_epoch - 1:>3}] {p.label}: {p.phase!r}")
        return "\n".join(lines)

    def __iter__(self):
        return iter(self.phases)

    def __len__(self):
        return len(self.phases)


def _name(i: int, phase: Phase) -> str:
    return f"phases[{i}] {type(phase).__name__}"


def resolve(phases: Sequence[Phase]) -> Plan:
    """Checks a phase list and resolves it into a `Plan`.

    Rules (each refusal names the phases involved and the fix):
      * phases come in the order Train* -> Prune? -> Cluster? -> Quantize?;
        Prune after Cluster would scatter the clusters, anything after
        Quantize would undo the quantization ranges, Train after a
        compressing phase would let pruned weights regrow and clusters drift;
      * at most one Prune, one Cluster and one Quantize;
      * sparsity preservation needs at least 3 clusters (zero is one of them).

    Args:
        phases: a non-empty list of `Train`, `Prune`, `Cluster`, `Quantize`.

    Returns:
        A `Plan` with epoch ranges and the preservation of each phase.
    """
    if isinstance(phases, Phase):
        raise PlanError(
            "`phases` must be a list of phases, not a single phase. "
            f"Wrap it in a list: phases=[{phases!r}]. Received: phases={phases!r}")
    try:
        phases = list(phases)
    except TypeError:
        raise PlanError(
            "`phases` must be a list of Train/Prune/Cluster/Quantize objects. "
            f"Received: phases={phases!r}") from None
    if not phases:
        raise PlanError(
            "`phases` is empty: nothing to do. Expected at least one phase, e.g. "
            "phases=[colopt.Train(epochs=5), colopt.Prune(sparsity=0.5, epochs=3)]. "
            "Received: phases=[]")
    for i, p in enumerate(phases):
        if not isinstance(p, Phase):
            raise PlanError(
                f"phases[{i}] is not a phase. Expected an instance of Train, Prune, Cluster "
                f"or Quantize from keras_colopt. Received: phases[{i}]={p!r}")

    seen = {}  # kind -> (index, phase) of the last phase of that kind
    for i, p in enumerate(phases):
        if p.kind != "train" and p.kind in seen:
            j, _ = seen[p.kind]
            raise PlanError(
                f"{_name(i, p)} repeats {_name(j, phases[j])}: a second {type(p).__name__} "
                f"phase would undo the first one's work. Merge them into one phase "
                f"(add up the epochs). Received: phases={phases!r}")
        for kind, (j, q) in seen.items():
            if _RANK[kind] > _RANK[p.kind]:
                raise PlanError(_order_message(i, p, j, q, phases))
        seen[p.kind] = (i, p)

    planned = []
    epoch = 0
    pruned: Optional[Prune] = None
    clustered: Optional[Cluster] = None
    cluster_kept_sparsity = False
    for i, p in enumerate(phases):
        start, end = epoch, epoch + p.epochs
        epoch = end
        if isinstance(p, Train):
            planned.append(PlannedPhase(i, p, "Train", start, end))
        elif isinstance(p, Prune):
            pruned = p
            label = "Prune" if p.m_by_n is None else f"Prune {p.m_by_n[0]}:{p.m_by_n[1]}"
            planned.append(PlannedPhase(i, p, label, start, end, sparsity=p.sparsity))
        elif isinstance(p, Cluster):
            clustered = p
            keep = (pruned is not None) if p.preserve_sparsity == "auto" else p.preserve_sparsity
            if keep and p.clusters < 3:
                raise PlanError(
                    f"{_name(i, p)} preserves sparsity with clusters={p.clusters}: zero takes "
                    "one of the clusters, which leaves too few for the non-zero weights. "
                    "Expected clusters >= 3 with sparsity preservation. Raise `clusters`, or "
                    f"pass preserve_sparsity=False. Received: clusters={p.clusters}, "
                    f"preserve_sparsity={p.preserve_sparsity!r}")
            if keep and pruned is None:
                raise PlanError(
                    f"{_name(i, p)} preserves sparsity, but no Prune phase comes before it: "
                    "there are no zeros of this plan's making to keep. Expected a Prune phase "
                    "earlier in the list. Add one; for a model pruned by an earlier call, list "
                    "that Prune phase too and pass initial_phase= to skip it; or pass "
                    f"preserve_sparsity='auto'. Received: phases={phases!r}")
            cluster_kept_sparsity = bool(keep)
            label = "Cluster" + (" (sparsity-preserving)" if keep else "")
            if p.per_channel:
                label += " per channel"
            planned.append(PlannedPhase(
                i, p, label, start, end, preserve_sparsity=bool(keep),
                sparsity=pruned.sparsity if (keep and pruned is not None) else None,
                clusters=p.clusters, per_channel=p.per_channel))
        elif isinstance(p, Quantize):
            if p.preserve == "auto":
                keep_sparsity = pruned is not None and (clustered is None or cluster_kept_sparsity)
                keep_clusters = clustered is not None
            else:
                keep_sparsity = "sparsity" in p.preserve
                keep_clusters = "clusters" in p.preserve
                _check_explicit_preserve(i, p, phases, pruned, clustered,
                                         cluster_kept_sparsity, keep_sparsity, keep_clusters)
            label = {(False, False): "QAT", (True, False): "PQAT", (False, True): "CQAT",
                     (True, True): "PCQAT"}[(keep_sparsity, keep_clusters)]
            planned.append(PlannedPhase(
                i, p, label, start, end, preserve_sparsity=keep_sparsity,
                preserve_clusters=keep_clusters,
                sparsity=pruned.sparsity if (keep_sparsity and pruned is not None) else None,
                clusters=clustered.clusters if (keep_clusters and clustered is not None) else None,
                per_channel=bool(keep_clusters and clustered is not None and clustered.per_channel)))
    return Plan(planned)


def _check_explicit_preserve(i, p, phases, pruned, clustered, cluster_kept_sparsity,
                             keep_sparsity, keep_clusters) -> None:
    """Refuses a `Quantize(preserve=...)` that names work no earlier phase did (or that an
    earlier phase undid): it would be labelled PQAT/CQAT/PCQAT with nothing to preserve, or
    train and then fail its invariants."""
    fix = ("Leave preserve='auto' to preserve what the phases before it made; for a model "
           "compressed by an earlier call, list those phases too and pass initial_phase= to "
           "skip them.")
    if keep_sparsity and pruned is None:
        raise PlanError(
            f"{_name(i, p)} preserves sparsity (preserve={p.preserve!r}), but no Prune phase "
            f"comes before it. Expected a Prune phase earlier in the list. {fix} "
            f"Received: phases={list(phases)!r}")
    if keep_sparsity and clustered is not None and not cluster_kept_sparsity:
        raise PlanError(
            f"{_name(i, p)} preserves sparsity (preserve={p.preserve!r}), but the Cluster phase "
            "before it does not (preserve_sparsity=False): clustering moved the pruned zeros "
            "into clusters, so there are none left to keep. Expected a sparsity-preserving "
            "Cluster phase. Pass Cluster(preserve_sparsity='auto'), or Quantize(preserve="
            f"'clusters'). Received: phases={list(phases)!r}")
    if keep_clusters and clustered is None:
        raise PlanError(
            f"{_name(i, p)} preserves clusters (preserve={p.preserve!r}), but no Cluster phase "
            f"comes before it. Expected a Cluster phase earlier in the list. {fix} "
            f"Received: phases={list(phases)!r}")


def _order_message(i, p, j, q, phases) -> str:
    later, earlier = type(p).__name__, type(q).__name__
    why = {
        ("Prune", "Cluster"): "pruning after clustering would scatter the clusters (it zeroes "
                              "weights inside every cluster, adding a value)",
        ("Train", "Prune"): "plain training after pruning lets the pruned weights regrow",
        ("Train", "Cluster"): "plain training after clustering lets the shared weights drift apart",
    }.get((later, earlier), f"{later} after Quantize would undo the quantization-aware "
                            "training (its ranges and fake-quant weights)")
    fix = {
        "Train": f"To fine-tune longer, add epochs to {_name(j, q)} instead: its last epochs "
                 "train with the compression held fixed.",
        "Prune": "Put Prune before Cluster (sparsity-preserving clustering follows it).",
    }.get(later, "Put Quantize last.")
    return (f"{_name(i, p)} comes after {_name(j, q)}: {why}. Expected the order "
            f"Train -> Prune -> Cluster -> Quantize. {fix} Received: phases={list(phases)!r}")
