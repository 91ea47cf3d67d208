import pytest

import keras_colopt as colopt
from keras_colopt import Cluster, PlanError, Prune, Quantize, Train, resolve


def test_epoch_ranges_are_continuous():
    plan = resolve([Train(epochs=2), Prune(sparsity=0.5, epochs=3), Cluster(clusters=8, epochs=1),
                    Quantize(epochs=2)])
    assert [(p.start_epoch, p.end_epoch) for p in plan] == [(0, 2), (2, 5), (5, 6), (6, 8)]
    assert plan.total_epochs == 8


@pytest.mark.parametrize("phases,labels", [
    ([Prune(sparsity=0.5, epochs=1), Cluster(clusters=8, epochs=1)],
     ["Prune", "Cluster (sparsity-preserving)"]),
    ([Prune(sparsity=0.5, epochs=1), Quantize(epochs=1)], ["Prune", "PQAT"]),
    ([Cluster(clusters=8, epochs=1), Quantize(epochs=1)], ["Cluster", "CQAT"]),
    ([Cluster(clusters=8, epochs=1, per_channel=True), Quantize(epochs=1)],
     ["Cluster per channel", "CQAT"]),
    ([Prune(sparsity=0.5, epochs=1), Cluster(clusters=8, epochs=1), Quantize(epochs=1)],
     ["Prune", "Cluster (sparsity-preserving)", "PCQAT"]),
    ([Train(epochs=1), Quantize(epochs=1)], ["Train", "QAT"]),
    # Overrides.
    ([Prune(sparsity=0.5, epochs=1), Cluster(clusters=8, epochs=1, preserve_sparsity=False),
      Quantize(epochs=1)], ["Prune", "Cluster", "CQAT"]),
    ([Prune(sparsity=0.5, epochs=1), Quantize(epochs=1, preserve="none")], ["Prune", "QAT"]),
])
def test_preservation_follows_phase_order(phases, labels):
    assert [p.label for p in resolve(phases)] == labels


def test_pcqat_carries_targets():
    plan = resolve([Prune(sparsity=0.6, epochs=1), Cluster(clusters=4, epochs=1, per_channel=True),
                    Quantize(epochs=1)])
    q = plan.phases[-1]
    assert (q.preserve_sparsity, q.preserve_clusters) == (True, True)
    assert (q.sparsity, q.clusters, q.per_channel) == (0.6, 4, True)


@pytest.mark.parametrize("phases,words", [
    ([Cluster(clusters=8, epochs=1), Prune(sparsity=0.5, epochs=1)],
     ["phases[1] Prune", "phases[0] Cluster", "scatter the clusters"]),
    ([Quantize(epochs=1), Cluster(clusters=8, epochs=1)], ["phases[1] Cluster", "Quantize last"]),
    ([Quantize(epochs=1), Train(epochs=1)], ["phases[1] Train", "phases[0] Quantize"]),
    ([Quantize(epochs=1), Quantize(epochs=1)], ["repeats", "Merge them"]),
    ([Prune(sparsity=0.5, epochs=1), Train(epochs=1)], ["regrow", "add epochs"]),
    ([Prune(sparsity=0.5, epochs=1), Cluster(clusters=2, epochs=1)], ["clusters >= 3"]),
    ([Cluster(clusters=2, epochs=1, preserve_sparsity=True)], ["clusters >= 3"]),
    ([], ["empty"]),
    ([Train(epochs=1), "Prune"], ["phases[1] is not a phase"]),
])
def test_refusals_name_the_phases_and_the_fix(phases, words):
    with pytest.raises(PlanError) as info:
        resolve(phases)
    for w in words:
        assert w in str(info.value)


def test_single_phase_not_in_list_is_refused():
    with pytest.raises(PlanError, match="Wrap it in a list"):
        resolve(Train(epochs=1))


def test_plan_error_is_a_value_error():
    assert issubclass(colopt.PlanError, ValueError)


@pytest.mark.parametrize("phases,words", [
    ([Train(epochs=1), Quantize(epochs=1, preserve="sparsity+clusters")],
     ["phases[1] Quantize", "no Prune phase", "initial_phase"]),
    ([Prune(sparsity=0.5, epochs=1), Quantize(epochs=1, preserve="clusters")],
     ["preserves clusters", "no Cluster phase"]),
    ([Cluster(clusters=8, epochs=1), Quantize(epochs=1, preserve="sparsity")],
     ["preserves sparsity", "no Prune phase"]),
    ([Prune(sparsity=0.5, epochs=1), Cluster(clusters=8, epochs=1, preserve_sparsity=False),
      Quantize(epochs=1, preserve="sparsity+clusters")],
     ["phases[2] Quantize", "preserve_sparsity=False", "preserve='clusters'"]),
    ([Train(epochs=1), Cluster(clusters=8, epochs=1, preserve_sparsity=True)],
     ["phases[1] Cluster", "no Prune phase"]),
])
def test_preservation_of_work_no_earlier_phase_did_is_refused(phases, words):
    with pytest.raises(PlanError) as info:
        resolve(phases)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_explicit_preservation_of_earlier_work_still_resolves():
    plan = resolve([Prune(sparsity=0.5, epochs=1), Cluster(clusters=8, epochs=1),
                    Quantize(epochs=1, preserve="sparsity")])
    assert plan.phases[-1].label == "PQAT"
