"""Property-based tests over random phase lists (hypothesis).

Random kinds in random order with random arguments, valid or not: every refusal is a
ValueError (PlanError for the order) raised before any training; a plan that resolves agrees
with the rules written out independently here; every plan survives a recipe round trip; and a
handful of valid plans train a tiny model without breaking an invariant.
"""

import inspect
from unittest import mock

import numpy as np
import pytest
import tf_keras as keras
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import keras_colopt as colopt
from keras_colopt import Cluster, PlanError, Prune, Quantize, Train, recipe, resolve

from conftest import tiny_sequential

CLASSES = {"train": Train, "prune": Prune, "cluster": Cluster, "quantize": Quantize}
RANK = {"train": 0, "prune": 1, "cluster": 2, "quantize": 3}

# Anything a user (or a recipe file) could pass where a value is expected.
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.text(max_size=4),
                 st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(0, 4),
                                                                          max_size=3))
EPOCHS = st.integers(1, 4)
LEARNING_RATE = st.one_of(st.none(), st.floats(1e-6, 1.0))
LAYERS = st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3))
VALID = {  # arguments in range (a few combinations the constructors still refuse)
    "train": st.fixed_dictionaries({"epochs": EPOCHS}, optional={"learning_rate": LEARNING_RATE}),
    "prune": st.fixed_dictionaries({"epochs": EPOCHS}, optional={
        "sparsity": st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]),
        "initial_sparsity": st.floats(0, 0.3),
        "schedule": st.sampled_from(["polynomial", "constant"]),
        "m_by_n": st.sampled_from([None, None, None, (2, 4), (1, 4)]),
        "learning_rate": LEARNING_RATE, "layers": LAYERS}),
    "cluster": st.fixed_dictionaries({"epochs": EPOCHS}, optional={
        "clusters": st.integers(2, 32),
        "init": st.sampled_from(["kmeans++", "linear", "density", "random"]),
        "per_channel": st.booleans(), "preserve_sparsity": st.sampled_from(["auto", True, False]),
        "learning_rate": LEARNING_RATE, "layers": LAYERS}),
    "quantize": st.fixed_dictionaries({"epochs": EPOCHS}, optional={
        "preserve": st.sampled_from(["auto", "none", "sparsity", "clusters", "sparsity+clusters"]),
        "learning_rate": LEARNING_RATE, "layers": LAYERS}),
}
ARG_NAMES = {kind: [a for a in inspect.signature(cls.__init__).parameters if a != "self"]
             for kind, cls in CLASSES.items()}  # every argument can receive junk


def _args(kind):
    """In-range arguments most of the time; sometimes one of them replaced by anything."""
    names = ARG_NAMES[kind]
    return st.tuples(VALID[kind], st.sampled_from([None] * (5 * len(names)) + names), JUNK).map(
        lambda t: t[0] if t[1] is None else {**t[0], t[1]: t[2]})


SPEC = st.sampled_from(list(CLASSES)).flatmap(lambda kind: st.tuples(st.just(kind), _args(kind)))
_LISTS = st.lists(SPEC, max_size=5)
# Kinds in random order, the same lists in the rules' order, and distinct kinds in order (so
# that plans of 3 or 4 phases resolve too).
SPECS = st.one_of(
    _LISTS, _LISTS.map(lambda specs: sorted(specs, key=lambda s: RANK[s[0]])),
    st.tuples(*[st.sampled_from([True, True, True, False])] * 4).flatmap(lambda keep: st.tuples(
        *[st.tuples(st.just(k), _args(k)) for k, kept in zip(CLASSES, keep) if kept])).map(list))


def _build(specs):
    """The phase objects of `specs`, or None when a constructor refused one (a ValueError:
    any other exception type fails the test)."""
    phases = []
    for kind, kwargs in specs:
        try:
            phases.append(CLASSES[kind](**kwargs))
        except ValueError as e:
            assert "Received:" in str(e) or "Wrap" in str(e), str(e)
            event(f"{kind} refused")
            return None
    event("constructed")
    return phases


def _keeps_sparsity(cluster, pruned_before):
    return pruned_before if cluster.preserve_sparsity == "auto" else cluster.preserve_sparsity


def _rules_allow(phases) -> bool:
    """The ordering rules of plan.resolve's docstring, written out independently."""
    if not phases:
        return False
    kinds = [p.kind for p in phases]
    if kinds != sorted(kinds, key=RANK.get):
        return False
    if any(kinds.count(k) > 1 for k in ("prune", "cluster", "quantize")):
        return False
    for i, p in enumerate(phases):
        if p.kind == "cluster" and _keeps_sparsity(p, "prune" in kinds[:i]) and (
                p.clusters < 3 or "prune" not in kinds[:i]):
            return False  # too few clusters for zero and the rest; or no zeros to keep
        if p.kind == "quantize" and p.preserve != "auto":
            cluster = next((q for q in phases[:i] if q.kind == "cluster"), None)
            if "sparsity" in p.preserve and ("prune" not in kinds[:i] or (
                    cluster is not None and not _keeps_sparsity(cluster, True))):
                return False  # no zeros made, or the clustering before it did not keep them
            if "clusters" in p.preserve and cluster is None:
                return False  # no clusters made
    return True


def _expected_label(i, phases):
    p, before = phases[i], [q.kind for q in phases[:i]]
    if p.kind == "cluster":
        keep = _keeps_sparsity(p, "prune" in before)
        return ("Cluster" + (" (sparsity-preserving)" if keep else "")
                + (" per channel" if p.per_channel else ""))
    if p.kind == "quantize":
        if p.preserve == "auto":
            cluster = next((q for q in phases[:i] if q.kind == "cluster"), None)
            sparsity = "prune" in before and (
                cluster is None or _keeps_sparsity(cluster, True))
            clusters = cluster is not None
        else:
            sparsity, clusters = "sparsity" in p.preserve, "clusters" in p.preserve
        return {(False, False): "QAT", (True, False): "PQAT", (False, True): "CQAT",
                (True, True): "PCQAT"}[(sparsity, clusters)]
    if p.kind == "prune" and p.m_by_n is not None:
        return f"Prune {p.m_by_n[0]}:{p.m_by_n[1]}"
    return type(p).__name__


@pytest.fixture(scope="module")
def tiny():
    model = tiny_sequential()
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    return model, x, y


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=SPECS)
def test_refusals_are_value_errors_before_any_training(tiny, specs):
    model, x, y = tiny
    phases = _build(specs)
    if phases is None:
        return
    configs = [p.get_config() for p in phases]
    try:
        plan = resolve(phases)
    except PlanError as e:
        event("plan refused")
        assert not _rules_allow(phases), f"refused a list the rules allow: {e}"
        weights = [w.copy() for w in model.get_weights()]
        with mock.patch.object(keras.Model, "fit", side_effect=AssertionError("fit called")), \
                pytest.raises(PlanError):
            colopt.collaborative_fit(model, x, y, phases=phases, verbose=0)
        assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
        return
    event(f"plan of {len(phases)} phase(s)")
    assert _rules_allow(phases), f"accepted a list the rules refuse: {phases!r}"
    # The plan agrees with the rules: contiguous epoch ranges, total = sum, labels.
    assert plan.total_epochs == sum(p.epochs for p in phases)
    ends = [0] + [p.end_epoch for p in plan]
    assert [p.start_epoch for p in plan] == ends[:-1]
    assert [p.epochs for p in plan] == [p.epochs for p in phases]
    assert [p.label for p in plan] == [_expected_label(i, phases) for i in range(len(phases))]
    assert [p.phase for p in plan] == phases and all(a is b for a, b in
                                                     zip((p.phase for p in plan), phases))
    assert [p.get_config() for p in phases] == configs  # resolve modifies no phase


@settings(max_examples=200, deadline=None)
@given(specs=SPECS, fmt=st.sampled_from(["yaml", "json"]))
def test_every_plan_survives_a_recipe_round_trip(specs, fmt):
    phases = _build(specs)
    if phases is None:
        return
    try:
        resolve(phases)
    except PlanError:
        with pytest.raises(recipe.RecipeError):
            recipe.dumps(phases, fmt)
        return
    event(f"round trip of {len(phases)} phase(s)")
    again = recipe.loads(recipe.dumps(phases, fmt), fmt)
    assert again.phases == phases
    assert [p.get_config() for p in again.phases] == [p.get_config() for p in phases]


NUMBERS = [("train", "epochs"), ("train", "learning_rate"), ("prune", "sparsity"),
           ("prune", "initial_sparsity"), ("cluster", "clusters"), ("quantize", "learning_rate")]


@settings(max_examples=300, deadline=None)
@given(target=st.sampled_from(NUMBERS), fmt=st.sampled_from(["yaml", "json"]),
       value=st.one_of(st.floats(), st.integers(), st.integers(2**62, 2**1100)))
def test_any_number_is_refused_or_round_trips(target, fmt, value):
    kind, arg = target
    kwargs = {"epochs": 1, "sparsity": 0.9} if kind == "prune" else {"epochs": 1}
    kwargs[arg] = value
    try:
        phase = CLASSES[kind](**kwargs)
    except ValueError as e:
        assert f"Received: {arg}=" in str(e) or "Received: initial_sparsity=" in str(e)
        return
    assert recipe.loads(recipe.dumps([phase], fmt), fmt).phases == [phase]


@st.composite
def valid_plans(draw):
    """A phase list that resolves, with arguments a 64-sample, 1-step-per-epoch run can keep."""
    phases = []
    if draw(st.booleans()):
        phases.append(Train(epochs=1))
    pruned = draw(st.booleans())
    if pruned:
        phases.append(Prune(sparsity=draw(st.sampled_from([0.3, 0.5, 0.75])),
                            epochs=draw(st.integers(1, 2)),
                            schedule=draw(st.sampled_from(["polynomial", "constant"]))))
    if draw(st.booleans()):
        phases.append(Cluster(clusters=draw(st.sampled_from([4, 8])), epochs=1,
                              init=draw(st.sampled_from(["kmeans++", "linear"])),
                              per_channel=draw(st.booleans())))
    if draw(st.booleans()) or not phases:
        phases.append(Quantize(epochs=1))
    return phases


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(phases=valid_plans())
# Generated examples start small; these two always run the longest paths too.
@example(phases=[Train(epochs=1), Prune(sparsity=0.5, epochs=2), Cluster(clusters=8, epochs=1),
                 Quantize(epochs=1)])
@example(phases=[Prune(sparsity=0.75, epochs=1, schedule="constant"),
                 Cluster(clusters=4, epochs=1, init="linear", per_channel=True),
                 Quantize(epochs=1)])
def test_valid_plans_train_without_breaking_an_invariant(tiny, phases):
    _, x, y = tiny
    plan = resolve(phases)
    event(" -> ".join(p.label for p in plan))
    # invariant_guard=True raises InvariantViolation at the first epoch end that breaks one.
    result = colopt.collaborative_fit(tiny_sequential(), x, y, phases=phases, batch_size=64,
                                      invariant_guard=True, verbose=0)
    assert result.stopped_early is None
    assert result.history.epoch == list(range(plan.total_epochs))
    assert result.history.history["phase"] == [p.label for p in plan for _ in range(p.epochs)]
