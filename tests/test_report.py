"""Report and the target walk, on constructed leaves (no training)."""

import json

import pytest

from keras_colopt.tree import LEAVES, walk
from keras_colopt.report import Baseline, LeafResult, Report, pareto_front

# (int8 accuracy, gzip bytes, latency ms) per leaf of a made-up model; baseline FP32 0.90.
FAKE = {"PTQ": (0.880, 26000, 1.0), "QAT": (0.895, 25000, 1.0),
        "Pruned+PTQ": (0.870, 19000, 1.0), "PQAT": (0.893, 18000, 1.0),
        "Clustered+PTQ": (0.860, 14000, 1.0), "CQAT": (0.891, 13500, 1.0),
        "SparseClustered+PTQ": (0.850, 12000, 1.0), "PCQAT": (0.892, 11500, 1.0)}


def run_walk(leaves=None, fail=(), **targets):
    leaves = list(LEAVES) if leaves is None else leaves
    report = Report(leaves=[LeafResult(name=n) for n in leaves],
                    baseline=Baseline(fp32_accuracy=0.90),
                    targets={"max_accuracy_drop": None, "max_size_bytes": None,
                             "max_latency_ms": None, **targets})
    built = []

    def build(name):
        built.append(name)
        if name in fail:
            return LeafResult(name=name, status="failed", reason="converter error")
        acc, size, ms = FAKE[name]
        return LeafResult(name=name, status="ok", int8_accuracy=acc, gzip_bytes=size,
                          tflite_bytes=30000, latency_ms=ms)

    active = any(v is not None for v in targets.values())
    report.leaves = walk(leaves, build, lambda r: active and not report.misses(r))
    report.choose()
    return report, built


def test_without_targets_every_leaf_is_built_level_by_level():
    report, built = run_walk()
    assert built == ["PTQ", "QAT", "Pruned+PTQ", "PQAT", "Clustered+PTQ", "CQAT",
                     "SparseClustered+PTQ", "PCQAT"]
    assert report.chosen is None and all(r.meets_targets is None for r in report.leaves)


def test_a_leaf_at_the_root_meeting_the_targets_stops_the_walk():
    report, built = run_walk(max_accuracy_drop=0.03)          # PTQ drops 2 points: met
    assert built == ["PTQ", "QAT"]
    assert report.chosen == "QAT"                              # smaller than PTQ
    assert {r.name: r.status for r in report.leaves}["PCQAT"] == "skipped"
    assert "below Baseline" in report.leaf("PCQAT").reason


def test_a_branch_stops_where_its_leaf_meets_the_targets():
    # 18 kB and at most 1 point of drop: PQAT (depth 1) meets it, so the walk does not
    # descend below Pruned; the Clustered branch is still walked and CQAT is smaller.
    report, built = run_walk(max_accuracy_drop=0.01, max_size_bytes=18000)
    assert built == ["PTQ", "QAT", "Pruned+PTQ", "PQAT", "Clustered+PTQ", "CQAT"]
    assert [report.leaf(n).status for n in ("SparseClustered+PTQ", "PCQAT")] == ["skipped"] * 2
    assert report.leaf("PQAT").meets_targets and report.leaf("CQAT").meets_targets
    assert report.leaf("Pruned+PTQ").meets_targets is False
    assert report.chosen == "CQAT"


def test_deepest_level_is_reached_when_only_it_meets_the_size():
    report, built = run_walk(max_accuracy_drop=0.01, max_size_bytes=12000)
    assert built[-2:] == ["SparseClustered+PTQ", "PCQAT"]
    assert report.chosen == "PCQAT"


def test_no_leaf_meets_a_target_says_which_and_by_how_much():
    report, _ = run_walk(max_size_bytes=10000, max_latency_ms=5.0)
    assert report.chosen is None
    assert list(report.missed) == ["max_size_bytes"]
    assert "PCQAT" in report.missed["max_size_bytes"]
    assert "1,500 B too much" in report.missed["max_size_bytes"]
    assert "No leaf met every target" in report.to_markdown()


def test_a_failed_leaf_never_meets_targets_and_the_walk_goes_on():
    report, built = run_walk(fail=("PTQ", "QAT"), max_accuracy_drop=0.03)
    assert "Pruned+PTQ" in built
    assert report.leaf("PTQ").status == "failed" and report.leaf("PTQ").meets_targets is None
    # PQAT meets the 3-point drop, so nothing below Pruned is built; CQAT is the smallest.
    assert report.leaf("PCQAT").status == "skipped"
    assert report.chosen == "CQAT"
    assert "PTQ failed: converter error" in report.to_markdown()


def test_requested_subset_only():
    report, built = run_walk(leaves=["PCQAT", "PTQ"], max_accuracy_drop=0.001)
    assert built == ["PTQ", "PCQAT"]
    assert [r.name for r in report.leaves] == ["PCQAT", "PTQ"]
    assert report.chosen is None and "max_accuracy_drop" in report.missed


def test_pareto_front():
    leaves = [LeafResult(name=n, status="ok", int8_accuracy=a, gzip_bytes=s)
              for n, (a, s, _) in FAKE.items()]
    # From the smallest up, each kept leaf is more accurate than every smaller one.
    assert [r.name for r in pareto_front(leaves)] == ["PCQAT", "PQAT", "QAT"]


def test_json_layout_and_failed_leaf():
    report, _ = run_walk(fail=("CQAT",))
    data = json.loads(report.to_json())
    assert set(data) >= {"leaves", "chosen"}
    cqat = next(leaf for leaf in data["leaves"] if leaf["name"] == "CQAT")
    assert cqat["status"] == "failed" and cqat["reason"] == "converter error"
    assert cqat["gzip_bytes"] is None
    md = report.to_markdown()
    assert "| CQAT | failed |" in md


@pytest.mark.parametrize("bad", [{"max_accuracy_drop": -0.1}, {"max_size_bytes": 0},
                                 {"max_latency_ms": float("nan")}, {"max_size_bytes": "1MB"}])
def test_bad_targets_are_refused_before_training(bad, digits, tmp_path):
    from conftest import tiny_sequential

    import keras_colopt as colopt

    (x, y), (xt, yt) = digits
    model = tiny_sequential()
    with pytest.raises(ValueError, match=next(iter(bad))):
        colopt.explore(model, x, y, validation_data=(xt, yt), out_dir=tmp_path, **bad)
    assert not (tmp_path / "report.md").exists()


def test_bad_leaves_and_phases_are_refused(digits, tmp_path):
    from conftest import tiny_sequential

    import keras_colopt as colopt

    (x, y), (xt, yt) = digits
    model = tiny_sequential()
    with pytest.raises(ValueError, match="Expected a non-empty subset of"):
        colopt.explore(model, x, y, validation_data=(xt, yt), out_dir=tmp_path,
                       leaves=["PTQ", "Pruned"])
    with pytest.raises(ValueError, match="`prune` must be a colopt.Prune"):
        colopt.explore(model, x, y, validation_data=(xt, yt), out_dir=tmp_path,
                       prune=colopt.Cluster(epochs=1))
    with pytest.raises(ValueError, match="validation_data"):
        colopt.explore(model, x, y, validation_data=(xt, yt[:3]), out_dir=tmp_path)
