"""collaborative_fit under tf.distribute.MirroredStrategy on two logical CPU devices.

Run in its own process (logical devices must be configured before TensorFlow starts):
    python distributed_run.py OUT [tfmot|keras3] [distill-step]
Writes OUT/result.json: replicas, the variables' distribution type per phase, the variables
whose replicas disagree, per-layer sparsity and unique values in the Keras model and in its
int8 .tflite, and (MirroredStrategy) what resuming from the finished run's checkpoint gave.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if "TF_CONFIG" not in os.environ:  # one process, two logical CPU devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu,
                                               [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ENGINE = sys.argv[2] if len(sys.argv) > 2 else "tfmot"
if ENGINE == "keras3":
    import keras  # noqa: E402
else:
    import tf_keras as keras  # noqa: E402

import conftest  # noqa: E402
import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.callbacks import layer_stats  # noqa: E402


def conv_bn_model():
    """Conv -> BatchNormalization -> ReLU -> Dense -> Dense on 8x8 digits, compiled: the
    moving statistics are what replicas must combine without a gradient."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ], name="tiny_bn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class Where(keras.callbacks.Callback):
    """Records, per phase, what kind of variables the model trains."""

    def __init__(self):
        super().__init__()
        self.kinds = []

    def on_train_begin(self, logs=None):
        self.kinds.append(sorted({type(_tf_variable(v)).__name__
                                  for v in self.model.trainable_variables}))


def _tf_variable(v):
    """The tf.Variable behind a variable (a Keras 3 variable holds one)."""
    return v if isinstance(v, tf.Variable) else v.value


def _replicas_disagree(model):
    """Variables whose copies on the replicas differ after training (every variable a phase
    writes in a step must be combined across replicas, or the copies drift apart)."""
    out = []
    for v in model.variables:
        tv = _tf_variable(v)
        if tv.synchronization == tf.VariableSynchronization.ON_READ:
            continue  # per-replica by design, read as their mean (tf_keras' BN statistics)
        copies = getattr(tv, "values", None) or ()
        if any(not np.array_equal(copies[0].numpy(), c.numpy()) for c in copies[1:]):
            out.append(getattr(v, "path", v.name))
    return out


def main(out):
    if "TF_CONFIG" in os.environ:  # one worker of several (see test_distribute.py)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = json.loads(os.environ["TF_CONFIG"])["task"]
        results = os.path.join(out, f"worker-{task['index']}")
    else:
        results = out
    if "TF_CONFIG" not in os.environ:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    os.makedirs(results, exist_ok=True)
    (x, y), (xt, yt) = data.load_digits()
    where = Where()

    def fit():
        return colopt.collaborative_fit(
            # Built outside the scope: collaborative_fit copies it inside.
            conv_bn_model(), x[:512], y[:512],
            phases=[colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=2),
                    colopt.Cluster(clusters=4, epochs=1), colopt.Quantize(epochs=1)],
            validation_data=(xt, yt), batch_size=64, verbose=0, strategy=strategy,
            callbacks=[where], checkpoint_dir=os.path.join(out, "ckpt"),
            log_dir=os.path.join(out, "logs"))
    result = fit()
    resumed = {}
    if "TF_CONFIG" not in os.environ:
        # The same call again: every epoch was checkpointed, so it restores the last phase's
        # state under the strategy instead of training.
        again = fit()
        resumed = {"resumed_at": again.resumed_at,
                   "same_weights": all(np.array_equal(a, b) for a, b in zip(
                       again.model.get_weights(), result.model.get_weights()))}
    info = colopt.export.to_tflite(result.model, os.path.join(results, "m.tflite"))
    stats = layer_stats(result.model)
    json.dump({
        "replicas": strategy.num_replicas_in_sync,
        "variable_types": where.kinds[:4],
        "replicas_disagree": _replicas_disagree(result.model),
        "phases": result.history.history["phase"],
        "keras": {n: [s.sparsity, s.unique_per_channel_max] for n, s in stats.items()},
        "tflite": [[w.name, w.sparsity, w.unique_per_channel_max]
                   for w in colopt.export.inspect_tflite(info.path)],
        "accuracy": colopt.export.evaluate_tflite(info.path, xt, yt),
        **resumed,
    }, open(os.path.join(results, "result.json"), "w"), indent=1)


def distilled_step(out):
    """One distilled SGD step of a linear model on two replicas: the update must be the one
    of the whole batch (each replica's soft loss scaled as Keras scales its own)."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    r, _, _, (hard, soft, w1, b1) = conftest.distil_one_step(keras, strategy)
    w, b = r.model.get_weights()
    json.dump({"replicas": strategy.num_replicas_in_sync,
               "weights_error": float(max(np.abs(w - w1).max(), np.abs(b - b1).max())),
               "loss_error": abs(r.history.history["loss"][0] - hard) / hard,
               "distill_loss_error": abs(r.history.history["distill_loss"][0] - soft) / soft},
              open(os.path.join(out, "distill.json"), "w"))


if __name__ == "__main__":
    if sys.argv[3:] == ["distill-step"]:
        distilled_step(sys.argv[1])
    else:
        main(sys.argv[1])
