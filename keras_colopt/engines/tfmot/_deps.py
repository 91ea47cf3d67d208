"""tf_keras and tfmot, imported once for the engine, leaving the user's environment as it was.

tfmot sets TF_USE_LEGACY_KERAS=1 as a side effect of its import; it is imported here only,
and the user's environment is restored right after. `tf.keras` is a lazy module that picks
Keras 3 or tf_keras from that variable on first use: it is resolved first, under the user's
environment, or it would name tf_keras for the rest of the process and change the meaning of
a Keras 3 user's own `tf.keras` code. (tfmot then sees Keras 3 under tf.keras and uses
tf_keras explicitly: its compat module checks `tf.keras.version()`.)
"""

import os

import tensorflow as tf

_prev_legacy = os.environ.get("TF_USE_LEGACY_KERAS")
tf.keras.__name__  # noqa: B018 (resolves the lazy module)
import tf_keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

if _prev_legacy is None:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
else:
    os.environ["TF_USE_LEGACY_KERAS"] = _prev_legacy

# tfmot's private modules (its wrapper, registry and quantizer classes) are imported by
# `compat`, with every other private name the engine touches.
__all__ = ["tf", "tf_keras", "tfmot"]
