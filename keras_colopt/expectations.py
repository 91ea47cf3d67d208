"""What a plan promises each layer during each phase, and the guard that checks it.

Read from the plan and the layers each phase touched, not from the wrappers (which miss
exactly the layers tfmot skips silently): a phase's own target (Prune's sparsity,
Cluster's clusters), what it preserves of earlier phases (sparsity-preserving clustering,
PQAT/CQAT/PCQAT), and what the layers it leaves alone must keep while they are held fixed.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from keras_colopt.monitors import CompressionMetrics, InvariantGuard
from keras_colopt.plan import Plan, PlannedPhase

Targets = Tuple[Dict[str, float], Dict[str, int]]


def of_phase(planned: PlannedPhase, touched: Sequence[str], pruned: Sequence[str],
             clustered: Sequence[str]) -> Targets:
    """`({layer: sparsity}, {layer: clusters})` for the layers `planned` touches."""
    sp, cl = {}, {}
    kind = planned.phase.kind
    if kind == "prune":
        sp = {n: planned.sparsity for n in touched}
    elif kind == "cluster":
        cl = {n: planned.clusters for n in touched}
        if planned.preserve_sparsity and planned.sparsity is not None:
            sp = {n: planned.sparsity for n in touched if n in pruned}
    elif kind == "quantize":
        if planned.preserve_sparsity and planned.sparsity is not None:
            sp = {n: planned.sparsity for n in touched if n in pruned}
        if planned.preserve_clusters and planned.clusters is not None:
            cl = {n: planned.clusters for n in touched if n in clustered}
    return sp, cl


def held_layers(planned: PlannedPhase, pruned: Sequence[str],
                clustered: Sequence[str]) -> List[str]:
    """Layers made sparse or clustered by an earlier phase: the ones this phase does not
    touch are held fixed (see `apply_phase(hold=...)`)."""
    if planned.phase.kind == "train":
        return []
    return sorted(set(pruned) | set(clustered))


def of_held(plan: Plan, planned: PlannedPhase, held: Sequence[str], pruned: Sequence[str],
            clustered: Sequence[str]) -> Targets:
    """What the held (frozen) layers must still show: the sparsity of the Prune phase and the
    clusters of the Cluster phase before this one."""
    before = plan.phases[:planned.index]
    prune = next((p for p in before if p.phase.kind == "prune"), None)
    cluster = next((p for p in before if p.phase.kind == "cluster"), None)
    sp = {n: prune.sparsity for n in held if prune is not None and n in pruned
          and (cluster is None or cluster.preserve_sparsity or n not in clustered)}
    cl = {n: cluster.clusters for n in held if cluster is not None and n in clustered}
    return sp, cl


def guard(plan: Plan, planned: PlannedPhase, touched: Sequence[str], held: Sequence[str],
          pruned: Sequence[str], clustered: Sequence[str], mode, tolerance: float,
          log_dir=None, kernels_from: CompressionMetrics = None):
    """The `InvariantGuard` of one phase (the layers it touches and the ones it holds), or
    None when the phase promises nothing to check. `mode`: True/"raise" or "warn"."""
    sp, cl = of_phase(planned, touched, pruned, clustered)
    hsp, hcl = of_held(plan, planned, held, pruned, clustered)
    sp, cl = {**hsp, **sp}, {**hcl, **cl}
    if not (sp or cl):
        return None
    # Held layers' clusters were made per output channel by an earlier Cluster phase: counted so.
    held_per_channel = bool(hcl) and any(p.phase.kind == "cluster" and p.per_channel
                                         for p in plan.phases[:planned.index])
    return InvariantGuard(sparsity=sp or None, clusters=cl or None,
                          mode="warn" if mode == "warn" else "raise", tolerance=tolerance,
                          phase=planned.label, log_dir=log_dir,
                          per_channel=planned.per_channel or held_per_channel,
                          kernels_from=kernels_from)
