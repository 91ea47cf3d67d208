import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tf_keras as keras  # noqa: E402

from keras_colopt import data  # noqa: E402

logging.getLogger("keras_colopt").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def digits():
    """A small slice of the embedded digits dataset: 512 train / 128 test."""
    (x, y), (xt, yt) = data.load_digits()
    return (x[:512], y[:512]), (xt[:128], yt[:128])


def compile_(model, lr=1e-2, keras=keras):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def tiny_sequential(seed=0, keras=keras):
    """Conv -> Dense -> Dense on 8x8 digits, compiled; `keras` is tf_keras or Keras 3."""
    keras.utils.set_random_seed(seed)
    return compile_(keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ], name="tiny"), keras=keras)


def linear(keras, seed, lr=0.0, classes=10):
    """Dense on the flattened 8x8 digits, logits, plain SGD: one step is computable by hand."""
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(classes, name="logits")],
                         name=f"linear{seed}")
    m.compile(optimizer=keras.optimizers.SGD(lr),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def distil_one_step(keras, strategy=None, temperature=3.0, weight=0.3, lr=0.5):
    """One distilled SGD step through collaborative_fit: a linear student and teacher on 32
    flattened digits, one batch. Returns (result, the teacher's kernel before the step, and
    `one_distilled_sgd_step`'s (hard, soft, kernel, bias) by hand)."""
    import keras_colopt as colopt

    (x, y), _ = data.load_digits()
    x, y = x[:32].reshape(32, 64), y[:32]
    student, teacher = linear(keras, 0, lr), linear(keras, 1)
    w0, b0 = [np.asarray(v, np.float64) for v in student.get_weights()]
    wt, bt = [np.asarray(v, np.float64) for v in teacher.get_weights()]
    r = colopt.collaborative_fit(
        student, x, y, phases=[colopt.Train(epochs=1)], batch_size=32, verbose=0,
        shuffle=False, strategy=strategy, compression_metrics=False,
        distill=colopt.Distill(teacher=teacher, temperature=temperature, weight=weight))
    return r, teacher, wt, one_distilled_sgd_step(x, y, w0, b0, wt, bt, temperature, weight, lr)


def one_distilled_sgd_step(x, y, w, b, wt, bt, temperature, weight, lr):
    """By hand, in float64, for a linear student (w, b) and teacher (wt, bt) on a batch:
    (the labels' loss, the soft-target loss) at the starting weights, and the weights after
    one SGD step on (1 - weight) * hard + weight * soft."""
    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    n, T = len(x), temperature
    s, t = x @ w + b, x @ wt + bt
    p = softmax(s)
    hard = -np.mean(np.log(p[np.arange(n), y]))
    pt, ps = softmax(t / T), softmax(s / T)
    soft = T ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1))
    # d/ds: ((1 - weight)(p - onehot) + weight * T * (ps - pt)) / n
    g = ((1 - weight) * (p - np.eye(w.shape[1])[y]) + weight * T * (ps - pt)) / n
    return hard, soft, w - lr * x.T @ g, b - lr * g.sum(axis=0)


def tiny_functional_relu(seed=0):
    """Conv2D -> standalone ReLU: the layout that makes tfmot's PQAT/CQAT/PCQAT skip the Conv2D."""
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, name="conv")(i)
    h = keras.layers.ReLU(name="conv_relu")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(16, name="hidden")(h)
    h = keras.layers.Activation("relu", name="hidden_relu")(h)
    o = keras.layers.Dense(10, name="logits")(h)
    return compile_(keras.Model(i, o, name="tiny_relu"))


@pytest.fixture
def seq_model():
    return tiny_sequential()


class Recorder(keras.callbacks.Callback):
    """Records what a user's callback sees."""

    def __init__(self):
        super().__init__()
        self.train_begins = 0
        self.epochs = []
        self.models = []
        self.log_keys = []

    def on_train_begin(self, logs=None):
        self.train_begins += 1
        self.models.append(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.log_keys.append(sorted(logs or {}))


@pytest.fixture(scope="session")
def dashboard_logs(tmp_path_factory, digits):
    """A log directory as the keras_colopt dashboard reads it, made once per session.

    - `run1`: collaborative_fit of `tiny_sequential` through Train, Prune 50%, Cluster 4 and
      PCQAT (one epoch each), then `to_tflite(..., log_dir=run1)`; `kernels[epoch]` holds
      the effective kernels a user callback saw at each epoch's end.
    - `violation`: a plain fit of a model with a nested backbone (`backbone/conv`, ...)
      with `CompressionMetrics` and an `InvariantGuard` in warn mode whose target the
      model does not meet (`logits` at 50% sparsity, never pruned).
    - `run1`'s .tflite is also measured on the Ethos-U55-128 (`to_tflite(target=...)`).
    - `explore/logs`: `explore` with two leaves (PTQ, QAT) and a target every leaf meets, on
      the Ethos-U55-128 (`target=EthosU(...)`).
    """
    import types

    import keras_colopt as colopt
    from keras_colopt import callbacks as cbs
    from keras_colopt.engines.base import Callback
    from test_nested import fine_tuning_model

    (x, y), (xt, yt) = digits
    x, y, xt, yt = x[:256], y[:256], xt[:64], yt[:64]
    root = tmp_path_factory.mktemp("dashboard") / "logs"
    kernels = {}

    class Snapshot(Callback):
        def on_epoch_end(self, epoch, logs=None):
            kernels[epoch] = {name: [np.array(w) for _, w, _ in ks]
                              for name, ks in cbs.effective_kernels(self.model).items()}

    run1 = root / "run1"
    result = colopt.collaborative_fit(
        tiny_sequential(), x, y,
        phases=[colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=1),
                colopt.Cluster(clusters=4, epochs=1), colopt.Quantize(epochs=1)],
        validation_data=(xt, yt), batch_size=64, log_dir=run1, callbacks=[Snapshot()],
        verbose=0)
    tflite = root.parent / "run1_int8.tflite"
    run1_on_npu = colopt.export.to_tflite(
        result.model, tflite, quantization="int8", log_dir=run1,
        target=colopt.targets.EthosU("ethos-u55-128")).on_target

    violation = root / "violation"
    nested = fine_tuning_model()
    guard = cbs.InvariantGuard(sparsity={"logits": 0.5}, mode="warn", log_dir=violation)
    with pytest.warns(RuntimeWarning, match="logits"):
        nested.fit(x, y, batch_size=64, epochs=2, verbose=0,
                   callbacks=[cbs.CompressionMetrics(log_dir=violation), guard])

    explore_out = root / "explore"
    report = colopt.explore(
        tiny_sequential(), x, y, validation_data=(xt, yt), out_dir=explore_out,
        leaves=["PTQ", "QAT"], quantize=colopt.Quantize(epochs=1), max_accuracy_drop=1.0,
        latency_runs=2, batch_size=64, target=colopt.targets.EthosU("ethos-u55-128"))
    return types.SimpleNamespace(root=root, run1=run1, result=result, kernels=kernels,
                                 tflite=tflite, run1_on_npu=run1_on_npu,
                                 violation=violation, guard=guard,
                                 nested=nested, explore=explore_out, report=report)
