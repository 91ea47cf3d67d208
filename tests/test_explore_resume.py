"""explore after a real SIGKILL: the same call again reuses the nodes and leaves that were
finished, trains only the rest, and says so; a changed call is refused before training."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(out, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, "explore_run.py"), str(out),
                           *args], capture_output=True, text=True, timeout=600)


def _leaves(out):
    with open(os.path.join(out, "tree", "report.json")) as f:
        report = json.load(f)
    return report, {r["name"]: r for r in report["leaves"]}


def test_explore_killed_in_a_leaf_goes_on_from_the_finished_nodes_and_leaves(tmp_path):
    # Fits in the walk: 1 = the Pruned node's Prune phase, 2 = the PQAT leaf's Quantize phase.
    killed = _run(tmp_path, "--kill-at-fit", "2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = tmp_path / "tree" / "state"
    assert (state / "nodes" / "pruned.json").exists()
    assert sorted(os.listdir(state / "leaves")) == ["pruned_ptq.json", "ptq.json"]
    _, before = _leaves(tmp_path)  # the report as the killed call last wrote it
    assert before["Pruned+PTQ"]["status"] == "ok" and before["PQAT"]["status"] == "pending"

    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    report, after = _leaves(tmp_path)
    assert [after[n]["reused"] for n in ("PTQ", "Pruned+PTQ", "PQAT")] == [True, True, False]
    assert all(r["status"] == "ok" for r in after.values())
    for name in ("PTQ", "Pruned+PTQ"):  # the measurements of the finished leaves, as they were
        assert after[name]["int8_accuracy"] == before[name]["int8_accuracy"]
        assert after[name]["tflite"] == before[name]["tflite"]
    # Only the PQAT leaf's Quantize epoch was trained: the Pruned node was loaded, not retrained.
    assert report["epochs_run"] == 1
    assert "explore: Pruned reused, trained by an earlier call" in again.stderr
    with open(tmp_path / "tree" / "report.md") as f:
        assert "Reused from an earlier call" in f.read()


def test_explore_refuses_out_dir_holding_another_calls_state(tmp_path):
    first = _run(tmp_path, "--kill-at-fit", "2")
    assert first.returncode == -9
    report_before = (tmp_path / "tree" / "report.json").read_text()
    changed = _run(tmp_path, "--sparsity", "0.6")  # StateMismatch, a CheckpointMismatch
    assert changed.returncode != 0
    assert "holds the nodes and leaves of a different call: the phases" in changed.stderr
    assert "delete that folder to start over" in changed.stderr
    # Refused before any training: the earlier call's report and state are as they were.
    assert (tmp_path / "tree" / "report.json").read_text() == report_before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_fingerprint_is_the_same_across_processes_for_the_same_call():
    """What explore's state compares holds no object address: a Distill's teacher counts by
    name and its settings, so the same call made again matches, and a changed one does not."""
    import keras_colopt as colopt
    from keras_colopt.tree_state import fingerprint

    from conftest import tiny_sequential

    model = tiny_sequential()
    teacher_a, teacher_b = tiny_sequential(seed=1), tiny_sequential(seed=1)

    def fp(teacher, temperature=3.0):
        return fingerprint(model, 256, 64, {"prune": {"sparsity": 0.5}}, {
            "distill": colopt.Distill(teacher=teacher, temperature=temperature),
            "rate_policy": colopt.RateProbe(), "batch_size": 64, "callbacks": [object()]})

    assert fp(teacher_a) == fp(teacher_b)
    assert fp(teacher_a) != fp(teacher_a, temperature=2.0)
    assert json.dumps(fp(teacher_a))  # plain JSON: what explore.json holds
