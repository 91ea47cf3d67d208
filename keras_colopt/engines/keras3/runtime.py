"""What `fit`, the callbacks, checkpoints, export and the command line need from Keras 3."""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import warnings

import numpy as np

from keras_colopt.engines import _flavour
from keras_colopt.engines.keras3 import compat
from keras_colopt.engines.keras3._deps import keras, tf

log = logging.getLogger("keras_colopt")


def check_callbacks(callbacks) -> list:
    return _flavour.check_callbacks(keras, callbacks, "Keras 3", "tf_keras")


def check_strategy(model, strategy) -> None:
    """Keras 3's own `fit` does not run under MultiWorkerMirroredStrategy (on 3.15 it fails
    at the first step reducing per-replica values: keras-team/keras#20585); Mirrored and
    one-device strategies train (tested). The engine's variables say how replicas combine
    their writes (`compress._add`)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError(
            f"Model '{model.name}' is a Keras 3 model, and Keras 3's `fit` does not run under "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585: it fails at the first step). "
            "Expected a strategy Keras 3 trains under, e.g. "
            "tf.distribute.MirroredStrategy() for the devices of one machine. To train on "
            "several machines, build the model with tf_keras, whose engine runs under "
            "MultiWorkerMirroredStrategy.")


class AverageReplicaStatistics(keras.callbacks.Callback):
    """Under a tf.distribute strategy with several replicas, Keras 3 leaves each replica's
    non-trainable float variables (BatchNormalization's moving mean and variance) to drift
    apart: they are created with aggregation "none", and the exported model gets the first
    replica's, computed on its share of the batches only. At every epoch end this sets each
    such variable to the mean of its replicas' copies, which for a moving average is the
    moving average of the replicas' batch statistics (tf_keras' "mean" aggregation)."""

    def on_epoch_end(self, epoch, logs=None):
        for v in self.model.non_trainable_variables:
            copies = getattr(v.value, "values", ())
            if (len(copies) > 1 and v.aggregation == "none"
                    and np.issubdtype(np.dtype(v.dtype), np.floating)):
                v.assign(np.mean([np.asarray(c.numpy()) for c in copies], axis=0))


def replica_callbacks() -> list:
    """The callbacks a phase needs under the current tf.distribute strategy."""
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        return [AverageReplicaStatistics()]
    return []


def check_distill(model) -> None:
    """The distilling train step is written for the TensorFlow backend (its gradient tape
    and its replica context); under another backend it would not be the step that runs."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"Distillation is not available under Keras' {backend!r} backend yet (model "
            f"'{model.name}'): its train step is written for TensorFlow. Expected "
            "KERAS_BACKEND=tensorflow. Run with KERAS_BACKEND=tensorflow, or compress "
            "without distill= (with labels) under this backend.")


def distillation(model, teacher, settings) -> list:
    from keras_colopt import distill

    temperature, weight = settings.temperature, settings.weight
    logits, sparse = distill.from_logits(model.loss), distill.sparse_labels(model.loss)
    tracker = keras.metrics.Mean(name="distill_loss")

    def train_step(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        target = teacher(x, training=False)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss, soft, hard = distill.mixed_loss(
                self, y, y_pred, target, temperature, weight, logits,
                lambda: self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw,
                                          training=True))
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        tracker.update_state(soft)
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        if y is None:  # metrics against the teacher's labels; the loss is the soft loss
            compat.loss_tracker(self).update_state(soft, sample_weight=batch)
            logs = self.compute_metrics(
                x, distill.teacher_labels(target, logits, sparse), y_pred, sample_weight=None)
        else:
            # Keras' own step logs the labels' loss through its loss tracker (unscaled).
            compat.loss_tracker(self).update_state(hard * replicas, sample_weight=batch)
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sw)
        logs["distill_loss"] = tracker.result()
        return logs

    return distill.install(model, train_step, tracker)


def fit_arguments() -> set:
    return set(inspect.signature(keras.Model.fit).parameters) - {"self"}


def is_sequence(x) -> bool:
    return isinstance(x, keras.utils.PyDataset)


def custom_object_scope(custom_objects):
    return keras.saving.custom_object_scope(dict(custom_objects))


def history(model, epochs, values):
    return _flavour.history(keras, model, epochs, values)


def tensorboard_callback(log_dir):
    return _flavour.tensorboard_callback(keras, log_dir)


def progbar_callback():
    return keras.callbacks.ProgbarLogger()


def is_progbar(callback) -> bool:
    return isinstance(callback, keras.callbacks.ProgbarLogger)


def _state(model):
    """What a checkpoint holds: the optimizer, and every variable of the model by position
    (as `get_weights` orders them). A TF checkpoint follows attributes, and a Keras 3 layer's
    variables are reachable so only where the engine set them (its masks on the layer): the
    compression state of a kernel part (a SeparableConv2D's, a recurrent cell's, held by the
    layer) and non-trainable variables such as BatchNormalization's statistics are not."""
    return tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                               variables=list(model.weights))


def save_state(model, path: str) -> None:
    _state(model).write(path)


def restore_state(model, path: str) -> None:
    model.optimizer.build(model.trainable_variables)
    _state(model).read(path).assert_existing_objects_matched()


def to_tflite_bytes(model, quantization: str, representative=None, sparse: bool = False,
                    qat: bool = False, io: str = "float32") -> bytes:
    """Converts a stripped Keras 3 model: exported as a SavedModel (its serving function),
    converted with TF's converter, builtin ops only (no silent Flex ops). `io="int8"`: the
    serving function traced at batch 1 (every shape static) and int8 input/output tensors."""
    backend = keras.backend.backend()
    if backend != "tensorflow" and (quantization != "none" or qat):
        raise RuntimeError(
            f"Cannot export a {quantization} .tflite under Keras' {backend!r} backend: the "
            "converter quantizes from TensorFlow's fake-quant ops, and a model exported from "
            f"{backend} carries its quantization as plain float arithmetic, so the file would "
            "hold no int8 weights. Train under any backend, save the model "
            "(model.save('model.keras')), then export it in a process with "
            "KERAS_BACKEND=tensorflow: keras_colopt.export.to_tflite("
            "keras.models.load_model('model.keras'), 'model.tflite').")
    loops = recurrent_loops(model)
    if loops and quantization == "int8":
        model = _unrolled(model, loops)
        loops = []
    with tempfile.TemporaryDirectory() as folder:
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(logging.WARNING)  # "Assets written to <a temporary folder>": noise
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # A recurrent loop converts to a WHILE only with every shape static.
                model.export(folder, format="tf_saved_model", verbose=False,
                             input_signature=_static_signature(model)
                             if io == "int8" or loops else None)
        finally:
            tf_log.setLevel(level)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.optimizations = ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []) \
            + ([tf.lite.Optimize.DEFAULT] if quantization != "none" else [])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        # A quantization-aware model carries a range on every tensor: no calibration.
        if quantization == "int8" and representative is not None and not qat:
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io == "int8":
            converter.inference_input_type = converter.inference_output_type = tf.int8
        return converter.convert()


def recurrent_loops(model) -> list:
    """The recurrent layers of `model` (inside nested models and Bidirectional too) that run
    their timesteps as a loop (`unroll=False`): `[(path name, the layer called in the model:
    the recurrent layer or its Bidirectional)]`."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += [(f"{layer.name}/{n}", l) for n, l in recurrent_loops(layer)]
        elif isinstance(layer, keras.layers.Bidirectional):
            out += [(f"{layer.name}/{l.name}", layer) for l in (layer.forward_layer,
                                                                layer.backward_layer)
                    if not l.unroll]
        elif isinstance(layer, keras.layers.RNN) and not layer.unroll:
            out.append((layer.name, layer))
    return out


def _unrolled(model, loops):
    """A copy of `model` whose recurrent layers are unrolled over their timesteps (same
    weights, same function): LiteRT converts a recurrent loop to a WHILE that its int8
    quantizer cannot take (the converter crashes the process on it: measured with LSTM, GRU
    and SimpleRNN), and an unrolled one to int8 FULLY_CONNECTED, LOGISTIC, TANH, MUL and ADD
    operators per timestep."""
    names = [n for n, _ in loops]
    free = [n for n, called in loops if _timesteps(called) is None]
    if free:
        raise ValueError(
            f"Cannot export an int8 .tflite of model '{model.name}': its recurrent layer(s) "
            f"{free} take sequences of any length, and LiteRT's int8 converter takes a "
            "recurrent layer only unrolled over a fixed number of timesteps. Expected a model "
            "input with a fixed sequence length, e.g. keras.Input((timesteps, features)). "
            "Build the model with one, or export with quantization='dynamic' or 'float16'.")

    def unroll(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config["unroll"] = True
        elif isinstance(layer, keras.layers.Bidirectional):
            for key in ("layer", "backward_layer"):
                if config.get(key):
                    config[key]["config"]["unroll"] = True
        return layer.__class__.from_config(config)
    try:
        copy = keras.models.clone_model(model, clone_function=unroll, recursive=True)
    except Exception as e:  # noqa: BLE001 (a subclassed model: no config to clone from)
        raise ValueError(
            f"Cannot export an int8 .tflite of model '{model.name}': its recurrent layer(s) "
            f"{names} convert to a loop LiteRT's int8 converter cannot take, and the model "
            f"could not be copied with them unrolled ({type(e).__name__}: {e}). Expected a "
            "Sequential or functional model. Build its recurrent layers with unroll=True, or "
            "export with quantization='dynamic' or 'float16'.") from None
    copy.set_weights(model.get_weights())
    log.info("int8 export of model '%s': recurrent layer(s) %s converted unrolled over their "
             "timesteps (LiteRT's int8 converter cannot quantize their loop); the model is "
             "unchanged.", model.name, names)
    return copy


def _timesteps(layer):
    try:
        return layer.input.shape[1]
    except (AttributeError, ValueError, IndexError):
        return None


def _static_signature(model):
    """The serving function's inputs at batch 1, named as the model's inputs (the names the
    file's signature keeps)."""
    specs = [tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype, name=t.name.split(":")[0])
             for t in model.inputs]
    return specs if len(specs) == 1 else [specs]


def load_model(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}. Expected a Keras 3 model saved with "
                                "model.save('model.keras').")
    return keras.models.load_model(path, compile=True)


def demo_model(seed: int = 0):
    """The demo's small CNN for 8x8x1 digits (compiled, Keras 3)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(64, activation="relu", name="dense1"),
        keras.layers.Dense(10, name="logits"),
    ], name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model
