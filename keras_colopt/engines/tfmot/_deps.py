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
from tf_keras.src.saving import serialization_lib  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from tensorflow_model_optimization.python.core.clustering.keras import (  # noqa: E402
    cluster_wrapper, clustering_registry)
from tensorflow_model_optimization.python.core.quantization.keras import (  # noqa: E402
    quantize_wrapper)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (  # noqa: E402,E501
    cluster_preserve_quantize_registry as cpq)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (  # noqa: E402,E501
    prune_preserve_quantize_registry as ppq)
from tensorflow_model_optimization.python.core.sparsity.keras import (  # noqa: E402
    prune_registry, pruning_wrapper)

if _prev_legacy is None:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
else:
    os.environ["TF_USE_LEGACY_KERAS"] = _prev_legacy

__all__ = ["tf", "tf_keras", "serialization_lib", "tfmot", "cluster_wrapper",
           "clustering_registry", "quantize_wrapper", "cpq", "ppq", "prune_registry",
           "pruning_wrapper"]
