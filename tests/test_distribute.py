"""collaborative_fit under tf.distribute: two logical CPU devices (MirroredStrategy) and two
worker processes on this machine (MultiWorkerMirroredStrategy). Each runs in its own process:
logical devices and TF_CONFIG must be set before TensorFlow starts."""

import json
import os
import socket
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_run.py")
PHASES = ["Train", "Prune", "Prune", "Cluster (sparsity-preserving)", "PCQAT"]


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)


def _check_invariants(result):
    assert result["replicas"] == 2
    # Every phase's model was built in the strategy's scope: its variables are mirrored.
    assert result["variable_types"] == [["MirroredVariable"]] * 4
    # Masks, steps and the moving ranges QAT writes in a step are combined across replicas.
    assert result["replicas_disagree"] == []
    assert result["phases"] == PHASES
    for layer, (sparsity, unique) in result["keras"].items():
        assert sparsity >= 0.5 - 0.005 and unique <= 4, layer
    assert len(result["tflite"]) == 3
    for name, sparsity, unique in result["tflite"]:
        assert sparsity >= 0.5 - 0.005 and unique <= 4, name


@pytest.mark.parametrize("engine", ["tfmot", "keras3"])
def test_mirrored_strategy_on_two_logical_devices(tmp_path, engine):
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path), engine], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    _check_invariants(result)
    assert (tmp_path / "ckpt" / "manifest.json").exists()
    assert (tmp_path / "logs").is_dir()
    # Resumed under the strategy from the complete checkpoint: the same model.
    assert result["resumed_at"] == 5 and result["same_weights"]


@pytest.mark.parametrize("engine", ["tfmot", "keras3"])
def test_a_distilled_step_on_two_replicas_is_the_whole_batch_step(tmp_path, engine):
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path), engine, "distill-step"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "distill.json").read_text())
    assert result["replicas"] == 2
    assert result["weights_error"] < 1e-5
    assert result["loss_error"] < 1e-5 and result["distill_loss_error"] < 1e-5


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_workers(tmp_path, engine):
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen([sys.executable, SCRIPT, str(tmp_path), engine],
                                      env=_env(TF_CONFIG=json.dumps(config)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs


def test_multi_worker_mirrored_strategy_with_two_processes(tmp_path):
    codes, outs = _run_workers(tmp_path, "tfmot")
    assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    results = [json.loads((tmp_path / f"worker-{i}" / "result.json").read_text())
               for i in range(2)]
    for r in results:
        _check_invariants(r)
    # Synchronous training: both workers end with the same model, byte for byte.
    assert ((tmp_path / "worker-0" / "m.tflite").read_bytes()
            == (tmp_path / "worker-1" / "m.tflite").read_bytes())
    # The chief writes the logs and checkpoint the user asked for; the other worker keeps
    # its own checkpoint beside it and writes no logs.
    assert (tmp_path / "ckpt" / "manifest.json").exists()
    assert (tmp_path / "ckpt" / "worker-1" / "manifest.json").exists()
    pids = {f.split(".")[4] for _, _, files in os.walk(tmp_path / "logs") for f in files}
    assert len(pids) == 1


def test_keras3_multi_worker_is_refused_before_training_on_every_worker(tmp_path):
    """Keras 3's fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585): both
    workers are told so before anything is written."""
    codes, outs = _run_workers(tmp_path, "keras3")
    assert codes[0] != 0 and codes[1] != 0
    for out in outs:
        assert "does not run under MultiWorkerMirroredStrategy" in out, out[-2000:]
        assert "keras-team/keras#20585" in out and "MirroredStrategy()" in out
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("multi-process TensorFlow test written for Linux")
