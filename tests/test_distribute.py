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
    assert result["phases"] == PHASES
    for layer, (sparsity, unique) in result["keras"].items():
        assert sparsity >= 0.5 - 0.005 and unique <= 4, layer
    assert len(result["tflite"]) == 3
    for name, sparsity, unique in result["tflite"]:
        assert sparsity >= 0.5 - 0.005 and unique <= 4, name


def test_mirrored_strategy_on_two_logical_devices(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_invariants(json.loads((tmp_path / "result.json").read_text()))
    assert (tmp_path / "ckpt" / "manifest.json").exists()


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multi_worker_mirrored_strategy_with_two_processes(tmp_path):
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen([sys.executable, SCRIPT, str(tmp_path)],
                                      env=_env(TF_CONFIG=json.dumps(config)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
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


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("multi-process TensorFlow test written for Linux")
