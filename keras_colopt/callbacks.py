"""The callbacks, in one public namespace.

- `CompressionMetrics` and `InvariantGuard` (`keras_colopt.monitors`) watch a model's
  compression in any `fit`, and are installed by `collaborative_fit`.
- `CollaborativeOptimization` (`keras_colopt.drop_in`) runs a whole plan inside one plain
  `model.fit`.
- `layer_stats` and `effective_kernels` (`keras_colopt.kernels`) read what each layer
  computes with, outside a fit.
"""

from keras_colopt.drop_in import CollaborativeOptimization
from keras_colopt.kernels import effective_kernels, layer_stats
from keras_colopt.monitors import CompressionMetrics, InvariantGuard
from keras_colopt.runner import BestValueReset, sibling_callbacks

__all__ = ["CollaborativeOptimization", "CompressionMetrics", "InvariantGuard",
           "effective_kernels", "layer_stats", "BestValueReset", "sibling_callbacks"]
