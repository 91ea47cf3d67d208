"""What `fit`, the callbacks, checkpoints, export and the command line need from tf_keras:
fit's arguments and callbacks, training state on disk, `.tflite` conversion, model files."""

from __future__ import annotations

import inspect
import os
import warnings

from keras_colopt.engines import _flavour
from keras_colopt.engines.tfmot._deps import tf, tf_keras

def check_callbacks(callbacks) -> list:
    """The user's callbacks as a list; refuses a single callback and foreign objects."""
    return _flavour.check_callbacks(tf_keras, callbacks, "tf_keras", "Keras 3")


def check_strategy(model, strategy) -> None:
    """tf_keras trains under every tf.distribute strategy (tested: Mirrored and
    MultiWorkerMirrored); tfmot's wrappers combine their variables across replicas."""


def check_distill(model) -> None:
    """tf_keras distils wherever it trains (its train step is TensorFlow's)."""


def distillation(model, teacher, settings) -> list:
    from keras_colopt import distill

    temperature, weight = settings.temperature, settings.weight
    logits, sparse = distill.from_logits(model.loss), distill.sparse_labels(model.loss)
    tracker = tf_keras.metrics.Mean(name="distill_loss")

    def train_step(self, data):
        x, y, sw = tf_keras.utils.unpack_x_y_sample_weight(data)
        target = teacher(x, training=False)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss, soft, _ = distill.mixed_loss(self, y, y_pred, target, temperature, weight,
                                               logits, lambda: self.compute_loss(x, y, y_pred, sw))
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        tracker.update_state(soft)
        if y is None:  # metrics against the teacher's labels; the loss is the soft loss
            logs = self.compute_metrics(
                x, distill.teacher_labels(target, logits, sparse), y_pred, None)
            logs["loss"] = tracker.result()
        else:
            logs = self.compute_metrics(x, y, y_pred, sw)
        logs["distill_loss"] = tracker.result()
        return logs

    return distill.install(model, train_step, tracker)


def fit_arguments() -> set:
    return set(inspect.signature(tf_keras.Model.fit).parameters) - {"self"}


def is_sequence(x) -> bool:
    return isinstance(x, tf_keras.utils.Sequence)


def custom_object_scope(custom_objects):
    return tf_keras.utils.custom_object_scope(dict(custom_objects))


def history(model, epochs, values):
    return _flavour.history(tf_keras, model, epochs, values)


def tensorboard_callback(log_dir):
    return _flavour.tensorboard_callback(tf_keras, log_dir)


def progbar_callback():
    return tf_keras.callbacks.ProgbarLogger(count_mode="steps")


def is_progbar(callback) -> bool:
    return isinstance(callback, tf_keras.callbacks.ProgbarLogger)


# --------------------------------------------------------------------------- training state

def save_state(model, path: str) -> None:
    """The wrapped model's variables (masks, pruning step, centroids, quantizer ranges) and
    its optimizer's, as a TF checkpoint at `path`."""
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(path)


def restore_state(model, path: str) -> None:
    optimizer = model.optimizer
    if hasattr(optimizer, "build"):
        optimizer.build(model.trainable_variables)  # its slots must exist to be restored
    status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(path)
    status.assert_existing_objects_matched()


# --------------------------------------------------------------------------- files

def to_tflite_bytes(model, quantization: str, representative=None, sparse: bool = False,
                    qat: bool = False, io: str = "float32") -> bytes:
    """Converts a stripped model with TF's converter.

    Args:
        representative: a generator function of calibration samples, or None.
        qat: whether the model is quantization-aware trained (its ranges are used).
        io: `"int8"`: the model traced at batch 1 (every shape static: no SHAPE /
            STRIDED_SLICE / PACK left for a Flatten) with int8 input and output tensors.
    """
    if io == "int8":
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [_static_function(model)], model)
        converter.inference_input_type = converter.inference_output_type = tf.int8
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []) + (
        [tf.lite.Optimize.DEFAULT] if quantization != "none" else [])
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8" and representative is not None:
        # Calibrates what QAT did not cover (all of a plain model, the unannotated layers of
        # a partly annotated one); QAT ranges are kept where they exist.
        converter.representative_dataset = representative
    if quantization == "int8" and not qat:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        # Expected for a QAT model with float inputs: the converter says it on every export.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were "
                                "expected, but not specified")
        return converter.convert()


def _static_function(model):
    """The model's inference at batch 1, as a concrete function whose inputs and outputs are
    named as the model's (the names the file's signature keeps)."""
    specs = [tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype, name=n)
             for t, n in zip(model.inputs, model.input_names)]
    names = list(model.output_names)

    @tf.function
    def serve(*args):
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        if isinstance(out, dict):
            return out
        return dict(zip(names, out if isinstance(out, (list, tuple)) else [out]))

    return serve.get_concrete_function(*specs)


def load_model(path):
    """A compiled tf_keras model from a `.keras` / `.h5` file (or SavedModel folder)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}. Expected a tf_keras model saved with "
                                "model.save('model.keras').")
    try:
        return tf_keras.models.load_model(path, compile=True)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; say what we needed
        raise ValueError(f"Cannot load {path!r} as a tf_keras model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Expected a compiled "
                         "tf_keras (Keras 2) model saved with model.save('model.keras'). A "
                         "Keras 3 model must be rebuilt with tf_keras.") from None


def demo_model(seed: int = 0):
    """The demo's small CNN for 8x8x1 digits (compiled, tf_keras)."""
    keras = tf_keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1",
                            input_shape=(8, 8, 1)),
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


def is_model(obj) -> bool:
    return isinstance(obj, tf_keras.Model)

