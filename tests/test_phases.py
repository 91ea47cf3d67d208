import re

import pytest

import keras_colopt as colopt
from keras_colopt.phases import PHASE_CLASSES

# One settings table for every phase: (class, kwargs that exercise every argument).
PHASE_SETTINGS = [
    (colopt.Train, {"epochs": 3, "learning_rate": 1e-3}),
    (colopt.Prune, {"sparsity": 0.5, "epochs": 2, "schedule": "constant", "initial_sparsity": 0.1,
                    "m_by_n": (2, 4), "learning_rate": 1e-4, "layers": ["dense"]}),
    (colopt.Cluster, {"clusters": 16, "epochs": 2, "init": "linear", "per_channel": True,
                      "preserve_sparsity": False, "learning_rate": 1e-5, "layers": ["conv"]}),
    (colopt.Quantize, {"epochs": 1, "preserve": "sparsity+clusters", "learning_rate": 1e-5,
                       "layers": ["conv", "dense"]}),
]


@pytest.mark.parametrize("cls,kwargs", PHASE_SETTINGS, ids=lambda v: getattr(v, "__name__", ""))
def test_get_config_round_trip(cls, kwargs):
    phase = cls(**kwargs)
    cfg = phase.get_config()
    # get_config returns exactly the constructor's arguments...
    assert set(cfg) == set(cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount])
    for k, v in kwargs.items():
        assert cfg[k] == (tuple(v) if k == "m_by_n" else v)
    # ...and from_config(cfg) rebuilds an equal phase.
    again = cls.from_config(cfg)
    assert again == phase and again.get_config() == cfg
    assert PHASE_CLASSES[cls.__name__] is cls


@pytest.mark.parametrize("make,match", [
    (lambda: colopt.Prune(sparsity=1.0, epochs=1), "sparsity=1.0"),
    (lambda: colopt.Prune(sparsity=-0.1, epochs=1), "sparsity=-0.1"),
    (lambda: colopt.Prune(sparsity=0.5, epochs=0), "epochs=0"),
    (lambda: colopt.Prune(sparsity=0.5, epochs=1.5), "epochs=1.5"),
    (lambda: colopt.Prune(sparsity=0.5), "epochs=None"),
    (lambda: colopt.Prune(sparsity=0.5, epochs=1, schedule="cubic"), "schedule='cubic'"),
    (lambda: colopt.Prune(sparsity=0.3, epochs=1, initial_sparsity=0.4), "initial_sparsity=0.4"),
    (lambda: colopt.Prune(sparsity=0.6, epochs=1, m_by_n=(2, 4)), "contradicts"),
    (lambda: colopt.Prune(sparsity=0.5, epochs=1, m_by_n=(4, 2)), "m_by_n=(4, 2)"),
    (lambda: colopt.Cluster(clusters=1, epochs=1), "clusters=1"),
    (lambda: colopt.Cluster(clusters=8, epochs=1, init="kmeans"), "init='kmeans'"),
    (lambda: colopt.Cluster(clusters=8, epochs=1, preserve_sparsity="yes"), "preserve_sparsity"),
    (lambda: colopt.Quantize(epochs=1, preserve="all"), "preserve='all'"),
    (lambda: colopt.Train(epochs=1, learning_rate=-1.0), "learning_rate=-1.0"),
    (lambda: colopt.Train(epochs=1, learning_rate=float("inf")), "learning_rate=inf"),
    (lambda: colopt.Train(epochs=1, learning_rate=10**400), "learning_rate=1000"),
    (lambda: colopt.Cluster(clusters=8, epochs=1, layers="conv"), "layers=['conv']"),
    (lambda: colopt.Cluster(clusters=8, epochs=1, layers=[]), "layers=[]"),
])
def test_bad_arguments_say_what_and_how(make, match):
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        make()
    assert "Received:" in str(info.value) or "Wrap" in str(info.value)
    assert "Expected" in str(info.value)


def test_layers_predicate_is_kept():
    pred = lambda layer: layer.name.startswith("dense")  # noqa: E731
    assert colopt.Prune(sparsity=0.5, epochs=1, layers=pred).layers is pred


def test_decay_is_none_or_cosine_and_a_cosine_spans_the_phase():
    from keras_colopt.phases import CosineDecay

    for cls in (colopt.Train, colopt.Prune, colopt.Cluster, colopt.Quantize):
        with pytest.raises(ValueError, match="unknown `decay`.*Received: decay='linear'"):
            cls(epochs=1, decay="linear")
        assert cls(epochs=3, decay="cosine").get_config()["decay"] == "cosine"
    assert colopt.Cluster(epochs=3, decay="cosine").schedule_for(1e-3, 7) == CosineDecay(1e-3, 21)
    assert colopt.Cluster(epochs=3).schedule_for(1e-3, 7) == pytest.approx(1e-3)
    assert colopt.Prune(epochs=2, learning_rate=5e-3, decay="cosine").schedule_for(
        {"class_name": "ExponentialDecay"}, 4) == CosineDecay(5e-3, 8)
