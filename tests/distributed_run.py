"""collaborative_fit under tf.distribute.MirroredStrategy on two logical CPU devices.

Run in its own process (logical devices must be configured before TensorFlow starts):
    python distributed_run.py OUT
Writes OUT/result.json: replicas, the variables' distribution type per phase, per-layer
sparsity and unique values in the Keras model and in its int8 .tflite.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402

if "TF_CONFIG" not in os.environ:  # one process, two logical CPU devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu,
                                               [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402
from keras_colopt.callbacks import layer_stats  # noqa: E402

from conftest import tiny_sequential  # noqa: E402


class Where(keras.callbacks.Callback):
    """Records, per phase, what kind of variables the model trains."""

    def __init__(self):
        super().__init__()
        self.kinds = []

    def on_train_begin(self, logs=None):
        self.kinds.append(sorted({type(v).__name__ for v in self.model.trainable_variables}))


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
    model = tiny_sequential()  # built outside the scope: collaborative_fit copies it inside
    where = Where()
    result = colopt.collaborative_fit(
        model, x[:512], y[:512], phases=[colopt.Train(epochs=1),
                                         colopt.Prune(sparsity=0.5, epochs=2),
                                         colopt.Cluster(clusters=4, epochs=1),
                                         colopt.Quantize(epochs=1)],
        validation_data=(xt, yt), batch_size=64, verbose=0, strategy=strategy,
        callbacks=[where], checkpoint_dir=os.path.join(out, "ckpt"),
        log_dir=os.path.join(out, "logs"))
    info = colopt.export.to_tflite(result.model, os.path.join(results, "m.tflite"))
    stats = layer_stats(result.model)
    json.dump({
        "replicas": strategy.num_replicas_in_sync,
        "variable_types": where.kinds,
        "phases": result.history.history["phase"],
        "keras": {n: [s.sparsity, s.unique_per_channel_max] for n, s in stats.items()},
        "tflite": [[w.name, w.sparsity, w.unique_per_channel_max]
                   for w in colopt.export.inspect_tflite(info.path)],
        "accuracy": colopt.export.evaluate_tflite(info.path, xt, yt),
    }, open(os.path.join(results, "result.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
