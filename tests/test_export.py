"""export: conversion options, atomic writes, and reading weights back from a .tflite."""

import os

import numpy as np
import pytest
import tf_keras as keras

from keras_colopt import export

from conftest import compile_, tiny_sequential


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), _ = digits
    model = tiny_sequential()
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    return model


@pytest.mark.parametrize("quantization,weight_dtype,min_agreement", [
    ("none", "float32", 1.0), ("float16", "float16", 0.99), ("dynamic", "int8", 0.95),
    ("int8", "int8", 0.9)])
def test_each_quantization_runs_in_litert(trained, digits, tmp_path, quantization, weight_dtype,
                                         min_agreement):
    (x, _), (xt, _) = digits
    info = export.to_tflite(trained, tmp_path / f"{quantization}.tflite",
                            quantization=quantization, representative_data=x[:64])
    assert os.path.getsize(info.path) == info.tflite_bytes
    assert 0 < info.gzip_bytes < info.tflite_bytes
    weights = export.inspect_tflite(info.path)
    assert len(weights) == 3
    # The converter leaves tensors under 1024 weights in float for dynamic range
    # quantization; the large Dense kernel is always converted.
    largest = max(weights, key=lambda w: np.prod(w.shape))
    assert largest.dtype == weight_dtype
    if quantization != "dynamic":
        assert {w.dtype for w in weights} == {weight_dtype}
    agree = np.mean(np.argmax(export.predict_tflite(info.path, xt), -1)
                    == np.argmax(trained.predict(xt, verbose=0), -1))
    assert agree >= min_agreement


def test_inspect_reads_what_was_put_in(tmp_path):
    keras.utils.set_random_seed(0)
    model = compile_(keras.Sequential([keras.layers.Dense(4, input_shape=(6,), name="d")]))
    # 6x4 kernel: output channel j holds the values {0, j+1}; half the entries are zero.
    k = np.zeros((6, 4), "float32")
    for j in range(4):
        k[: 3, j] = j + 1.0
    model.get_layer("d").kernel.assign(k)
    info = export.to_tflite(model, tmp_path / "d.tflite", quantization="none")
    (w,) = export.inspect_tflite(info.path)
    assert w.op == "FULLY_CONNECTED" and w.shape == (4, 6)
    assert w.sparsity == 0.5
    assert w.unique == 5 and w.unique_per_channel_max == 2


def test_int8_ptq_needs_representative_data_and_keeps_the_old_file(trained, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"a good model")
    with pytest.raises(ValueError, match="representative_data"):
        export.to_tflite(trained, path, quantization="int8")
    assert path.read_bytes() == b"a good model"


def test_failed_conversion_leaves_no_partial_file(trained, tmp_path, monkeypatch):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"a good model")

    def broken(*a, **k):
        raise RuntimeError("converter crashed")
    monkeypatch.setattr(export, "convert", broken)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export.to_tflite(trained, path, quantization="none")
    assert path.read_bytes() == b"a good model"
    assert os.listdir(tmp_path) == ["m.tflite"]


@pytest.mark.parametrize("make_path,match", [
    (lambda tmp: tmp / "missing" / "m.tflite", "does not exist"),
    (lambda tmp: tmp, "is a directory"),
])
def test_bad_paths_are_refused_before_converting(trained, tmp_path, make_path, match,
                                                 monkeypatch):
    called = []
    monkeypatch.setattr(export, "convert", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=match):
        export.to_tflite(trained, make_path(tmp_path), quantization="none")
    assert not called


def test_unknown_quantization(trained, tmp_path):
    with pytest.raises(ValueError, match="quantization='int4'"):
        export.to_tflite(trained, tmp_path / "m.tflite", quantization="int4")


def test_evaluate_tflite_matches_keras_on_float_export(trained, digits, tmp_path):
    _, (xt, yt) = digits
    info = export.to_tflite(trained, tmp_path / "f.tflite", quantization="none")
    keras_acc = trained.evaluate(xt, yt, verbose=0)[1]
    assert export.evaluate_tflite(info.path, xt, yt) == pytest.approx(keras_acc, abs=1e-6)


def test_gzip_size_shrinks_with_sparsity():
    rng = np.random.default_rng(0)
    dense = rng.integers(-127, 127, 10000).astype(np.int8).tobytes()
    sparse = np.where(rng.random(10000) < 0.5, 0,
                      rng.integers(-127, 127, 10000)).astype(np.int8).tobytes()
    assert export.gzip_size(sparse) < export.gzip_size(dense)


def test_sparse_encoding_shrinks_a_very_sparse_file_and_still_runs(digits, tmp_path):
    (x, y), (xt, yt) = digits
    model = keras.Sequential([keras.layers.Dense(256, input_shape=(64,), name="big"),
                              keras.layers.Dense(10, name="out")])
    rng = np.random.default_rng(0)
    weights = model.get_weights()
    weights[0] = np.where(rng.random(weights[0].shape) < 0.9, 0.0, weights[0])  # 90 % zeros
    model.set_weights(weights)
    flat = xt.reshape(len(xt), -1)
    dense = export.to_tflite(model, tmp_path / "dense.tflite", "int8",
                             representative_data=flat[:64])
    sparse = export.to_tflite(model, tmp_path / "sparse.tflite", "int8",
                              representative_data=flat[:64], sparse=True)
    assert sparse.tflite_bytes < 0.7 * dense.tflite_bytes  # 23,864 -> 14,584 B measured
    assert export.runtime_of(dense.path) == "xnnpack"
    assert "builtin kernels" in export.runtime_of(sparse.path)  # XNNPACK refuses sparse int8
    # The same int8 weights; LiteRT's builtin kernels and XNNPACK may round a requantized
    # output one int8 step apart (measured: 12 of 1,280 logits, by 0.0026).
    a, b = export.predict_tflite(sparse.path, flat), export.predict_tflite(dense.path, flat)
    np.testing.assert_allclose(a, b, atol=0.01)
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.98
    with pytest.raises(ValueError, match="`sparse` must be a bool"):
        export.convert(model, "int8", flat[:8], sparse="yes")


def test_latency_is_a_positive_median_and_grows_with_the_model(trained, digits, tmp_path):
    (_, _), (xt, _) = digits
    small = export.to_tflite(trained, tmp_path / "small.tflite", "none")
    big = keras.Sequential([keras.layers.Dense(2048, input_shape=(8, 8, 1)),
                            keras.layers.Flatten(), keras.layers.Dense(10)])
    big_info = export.to_tflite(big, tmp_path / "big.tflite", "none")
    t_small = export.latency_ms(small.path, xt[0], runs=20)
    t_big = export.latency_ms(big_info.path, xt[:1], runs=20)
    assert 0 < t_small < t_big
    with pytest.raises(ValueError, match="`runs` must be a positive int"):
        export.latency_ms(small.path, xt[0], runs=0)


def test_write_atomic_replaces_whole_files_only(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    export.write_atomic(target, "first")
    assert target.read_text() == "first"
    assert target.stat().st_mode & 0o044  # readable by others as usual, not mkstemp's 0600
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:3])
            raise OSError("disk full")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        export.write_atomic(target, "second")
    assert target.read_text() == "first"
    assert os.listdir(tmp_path) == ["report.md"]


def test_write_atomic_flushes_the_file_then_the_rename_to_disk(tmp_path, monkeypatch):
    """A power loss after write_atomic returns keeps the new file: its bytes are fsynced
    before the rename, and the folder (the rename) after it."""
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((kind, os.fstat(fd).st_size if kind == "file" else None))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", None))
        real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    export.write_atomic(tmp_path / "manifest.json", "x" * 10)
    assert events == [("file", 10), ("rename", None), ("folder", None)]


def test_read_weights_and_entropy_of_a_clustered_tensor(tmp_path):
    model = keras.Sequential([keras.layers.Dense(64, input_shape=(32,), name="d")])
    w, b = model.get_weights()
    rng = np.random.default_rng(0)
    model.set_weights([rng.choice([-0.5, 0.0, 0.25, 0.5], size=w.shape), b])  # 4 values
    info = export.to_tflite(model, tmp_path / "m.tflite", "int8",
                            representative_data=rng.normal(size=(16, 32)).astype("float32"))
    (stored,) = export.read_weights(info.path).values()
    assert stored.dtype == np.int8 and stored.shape == (64, 32)
    (inspected,) = export.inspect_tflite(info.path)
    # Four equiprobable-ish stored values: close to 2 bits per weight.
    assert inspected.entropy_bits == pytest.approx(2 * stored.size, rel=0.02)
    assert export.gzip_size(stored.tobytes()) < stored.size / 2   # gzip sees it too
