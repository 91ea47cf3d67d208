"""keras_colopt: collaborative optimization (prune, cluster, quantize) for Keras models.

Example:
    >>> import keras_colopt as colopt
    >>> result = colopt.collaborative_fit(model, x, y, phases=[
    ...     colopt.Train(epochs=5), colopt.Prune(sparsity=0.5, epochs=3),
    ...     colopt.Cluster(clusters=8, epochs=3), colopt.Quantize(epochs=2)])
    >>> colopt.export.to_tflite(result.model, "model.tflite", quantization="int8")
"""

__version__ = "0.1.0"

from keras_colopt import _quiet  # noqa: E402

_quiet.for_command_line()  # before TensorFlow is imported: its native log lines are dropped

from keras_colopt import callbacks, export, recipe, report, stats, targets  # noqa: E402,F401
# A compressed or quantization-aware Keras 3 model saved to .keras names the engine's layer
# classes; importing the engine registers them, so keras.models.load_model reads such a file
# in a new process (importing Keras 3 changes nothing of what tf.keras or keras mean).
from keras_colopt.engines import keras3 as _keras3_classes  # noqa: E402,F401
from keras_colopt.tree import explore  # noqa: E402,F401
from keras_colopt.study import SearchSpace, search  # noqa: E402,F401
from keras_colopt.tree_state import StateMismatch  # noqa: E402,F401
from keras_colopt.checkpoint import CheckpointMismatch  # noqa: E402,F401
from keras_colopt.distill import Distill  # noqa: E402,F401
from keras_colopt.finetune import RateProbe  # noqa: E402,F401
from keras_colopt.export import strip  # noqa: E402,F401
from keras_colopt.fit import FitResult, TrainingDiverged, collaborative_fit  # noqa: E402,F401
from keras_colopt.invariants import InvariantViolation  # noqa: E402,F401
from keras_colopt.phases import Cluster, Phase, Prune, Quantize, Train  # noqa: E402,F401
from keras_colopt.plan import Plan, PlanError, resolve  # noqa: E402,F401
