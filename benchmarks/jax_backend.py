"""What of the Keras 3 engine works under Keras' JAX backend (issue 11's stretch).

Runs itself under KERAS_BACKEND=jax (needs `pip install jax`; TensorFlow stays installed, as
the library imports it). On a small CNN of the embedded digits (Conv2D, DepthwiseConv2D,
BatchNormalization, Dense): Prune 50% (collaborative_fit), Prune -> sparsity-preserving
Cluster 8 -> PCQAT (collaborative_fit), the same plan inside one plain model.fit
(CollaborativeOptimization), the plan distilled from the float model without labels, save/load of the compressed model, and export: int8 export under
JAX (refused, by design: the converter quantizes from TensorFlow's fake-quant ops), then the
saved .keras exported by a KERAS_BACKEND=tensorflow process, and what survived in that file.
Each check records what it found; nothing is asserted, so a failure is reported, not hidden.

Run: python benchmarks/jax_backend.py    (writes benchmarks/results/jax_backend.{json,md})
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

if os.environ.get("KERAS_BACKEND") != "jax":  # the backend is read at Keras' import
    os.execve(sys.executable, [sys.executable] + sys.argv,
              {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"})

import numpy as np  # noqa: E402

import keras  # noqa: E402
import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.engines.keras3 import compress  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
(x, y), (xt, yt) = data.load_digits()
PLAN = lambda: [colopt.Prune(sparsity=0.5, epochs=2), colopt.Cluster(clusters=8, epochs=2),  # noqa: E731
                colopt.Quantize(epochs=1)]
checks, state = {}, {}
work = tempfile.mkdtemp()


def model(seed=0):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input(x.shape[1:]),
                          keras.layers.Conv2D(16, 3, activation="relu", name="conv"),
                          keras.layers.DepthwiseConv2D(3, name="dw"),
                          keras.layers.BatchNormalization(name="bn"),
                          keras.layers.ReLU(name="relu"),
                          keras.layers.Flatten(name="flat"),
                          keras.layers.Dense(10, activation="softmax", name="dense")])
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return m


def kernels(m):
    """Per compressed layer: fraction of zeros, distinct values, max distinct per channel."""
    out = {}
    for layer in m.layers:
        if compress.is_compressed(layer):
            k = compress.effective_numpy(layer)
            per_ch = k.reshape(-1, compress.view_channels(layer))
            out[layer.name] = {"zeros": round(float(np.mean(k == 0)), 3),
                               "unique": int(len(np.unique(k))),
                               "unique_per_channel_max": int(max(len(np.unique(c))
                                                                 for c in per_ch.T))}
    return out


def check(name, fn):
    t = time.perf_counter()
    try:
        checks[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - every failure is reported
        traceback.print_exc()
        checks[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    checks[name]["seconds"] = round(time.perf_counter() - t, 1)
    print(name, checks[name], flush=True)


def prune():
    r = colopt.collaborative_fit(model(), x, y, phases=[colopt.Prune(sparsity=0.5, epochs=2)],
                                 batch_size=32, verbose=0)
    state["pruned"] = r.model
    return {"kernels": kernels(r.model)}


def pcqat():
    r = colopt.collaborative_fit(model(), x, y, phases=PLAN(), batch_size=32, verbose=0,
                                 validation_data=(xt, yt))
    state["pcqat"] = r.model
    return {"kernels": kernels(r.model),
            "val_accuracy": [round(v, 4) for v in r.history.history["val_accuracy"]]}


def plain_fit():
    m = model()
    m.fit(x, y, epochs=5, batch_size=32, verbose=0,
          callbacks=[colopt.callbacks.CollaborativeOptimization(PLAN())])
    return {"kernels": kernels(m), "accuracy": round(float(m.evaluate(xt, yt, verbose=0)[1]), 4)}


def distill_unlabelled():
    r = colopt.collaborative_fit(model(), x, None, phases=PLAN(), batch_size=32, verbose=0,
                                 distill=True, validation_data=(xt, yt))
    return {"kernels": kernels(r.model),
            "val_accuracy": [round(v, 4) for v in r.history.history["val_accuracy"]]}


def save_load():
    path = os.path.join(work, "pcqat.keras")
    state["pcqat"].save(path)
    back = keras.models.load_model(path)
    diff = float(np.abs(back.predict(xt, verbose=0) - state["pcqat"].predict(xt, verbose=0)).max())
    return {"max_abs_output_difference": diff, "kernels_equal": kernels(back) == kernels(
        state["pcqat"])}


def export_under_jax():
    try:
        colopt.export.to_tflite(state["pcqat"], os.path.join(work, "jax.tflite"))
    except RuntimeError as e:
        return {"refused": True, "message": str(e)[:160] + "..."}
    return {"refused": False}


def export_under_tensorflow():
    code = ("import json, sys, keras, keras_colopt as c; from keras_colopt import data; "
            "(x, y), (xt, yt) = data.load_digits(); "
            "i = c.export.to_tflite(keras.models.load_model(sys.argv[1]), sys.argv[2]); "
            "print('RESULT', json.dumps({'int8_accuracy': c.export.evaluate_tflite(i.path, xt, "
            "yt), 'gzip_bytes': i.gzip_bytes, 'survived': [{'tensor': w.name, 'sparsity': "
            "round(w.sparsity, 3), 'values_per_channel_max': w.unique_per_channel_max} for w in "
            "c.export.inspect_tflite(i.path)]}))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(work, "pcqat.keras"),
                           os.path.join(work, "tf.tflite")], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    if not line:
        raise RuntimeError(proc.stderr[-1500:])
    return json.loads(line[0][len("RESULT "):])


def main():
    import jax

    for name, fn in [("prune", prune), ("prune_cluster_pcqat", pcqat),
                     ("one_plain_fit_with_CollaborativeOptimization", plain_fit),
                     ("distill_without_labels", distill_unlabelled),
                     ("save_load_keras_file", save_load), ("int8_export_under_jax", export_under_jax),
                     ("saved_file_exported_under_tensorflow", export_under_tensorflow)]:
        check(name, fn)
    out = {"checks": checks, "command": "python benchmarks/jax_backend.py",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "keras": keras.__version__,
                       "backend": keras.backend.backend()}}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "jax_backend.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = ["# The Keras 3 engine under the JAX backend", "",
             f"Command: `{out['command']}`; JAX {jax.__version__}, Keras {keras.__version__}, "
             f"{os.cpu_count()} CPUs. Digits CNN (Conv2D, DepthwiseConv2D, BatchNormalization, "
             "Dense); plan Prune 50% (2) -> Cluster 8 sparsity-preserving (2) -> PCQAT (1).", "",
             "| check | works | what it found | s |", "|---|---|---|---:|"]
    for name, c in checks.items():
        found = {k: v for k, v in c.items() if k not in ("ok", "seconds", "survived")}
        lines.append(f"| {name} | {'yes' if c['ok'] else 'NO'} | "
                     f"{json.dumps(found)[:400].replace('|', '/')} | {c['seconds']} |")
    surv = checks.get("saved_file_exported_under_tensorflow", {}).get("survived", [])
    if surv:
        lines += ["", "What survived in the int8 file exported (TensorFlow backend) from the "
                  "model trained under JAX:", "", "| tensor | sparsity | values per channel "
                  "(max) |", "|---|---:|---:|"]
        lines += [f"| {w['tensor']} | {w['sparsity']:.3f} | {w['values_per_channel_max']} |"
                  for w in surv]
    with open(os.path.join(HERE, "results", "jax_backend.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
