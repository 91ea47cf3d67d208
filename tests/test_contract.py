"""One contract, every phase: each phase from a single settings table, run alone (after a short
Train) through collaborative_fit, must keep the same promises."""

import numpy as np
import pytest

import keras_colopt as colopt
from keras_colopt.callbacks import layer_stats
from keras_colopt.engines import tfmot as engine

from conftest import Recorder, tiny_sequential

# phase, its label in the plan, and what must hold on the returned model's kernels.
SETTINGS = [
    (colopt.Train(epochs=2, learning_rate=5e-3), "Train",
     lambda st: all(s.sparsity == 0.0 for s in st.values())),
    (colopt.Prune(sparsity=0.75, epochs=2, schedule="constant", layers=["hidden", "logits"]),
     "Prune", lambda st: st["hidden"].sparsity >= 0.74 and st["conv"].sparsity == 0.0),
    (colopt.Cluster(clusters=6, epochs=2, init="density", layers=["hidden"]), "Cluster",
     lambda st: st["hidden"].unique <= 6 and st["logits"].unique > 6),
    (colopt.Quantize(epochs=2), "QAT", lambda st: st["hidden"].unique <= 255),
]


@pytest.mark.parametrize("phase,label,holds", SETTINGS, ids=[s[1] for s in SETTINGS])
def test_phase_contract(digits, tmp_path, phase, label, holds):
    (x, y), (xt, yt) = digits
    model = tiny_sequential()
    before = [w.copy() for w in model.get_weights()]
    rec = Recorder()
    r = colopt.collaborative_fit(model, x, y, phases=[colopt.Train(epochs=1), phase],
                                 validation_data=(xt, yt), batch_size=64, callbacks=[rec],
                                 log_dir=tmp_path / "logs", verbose=0)
    # The plan, the epoch axis and the history.
    assert [p.label for p in r.plan] == ["Train", label]
    assert rec.epochs == [0, 1, 2] and rec.train_begins == 2
    assert r.history.history["phase"] == ["Train", label, label]
    assert len(r.history.history["compression/sparsity"]) == 3
    # The phase's own promise, on the weights the model computes with.
    assert holds(layer_stats(r.model))
    # A Quantize phase returns a QAT model; the others do not.
    assert engine.is_qat(r.model) == (label == "QAT")
    # The config round-trips, and the user's model is untouched.
    assert type(phase).from_config(phase.get_config()) == phase
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # And it exports.
    info = colopt.export.to_tflite(r.model, tmp_path / "m.tflite", quantization="int8",
                                   representative_data=x[:32])
    assert info.gzip_bytes > 0
