"""An existing hand-written tfmot pruning pipeline, plus the two drop-in callbacks: per-layer
sparsity in TensorBoard, and an error the moment the invariant breaks."""
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import keras_colopt as colopt
from _common import OUT, baseline, report, x, y

model, base = baseline(tf_keras=True)  # tfmot's own callbacks: a tf_keras model
schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=2 * 45,
                                                frequency=9)
pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
pruned.fit(x, y, batch_size=32, epochs=3, verbose=2,
           callbacks=[tfmot.sparsity.keras.UpdatePruningStep(),
                      colopt.callbacks.CompressionMetrics(log_dir=f"{OUT}/logs"),  # added
                      colopt.callbacks.InvariantGuard(sparsity=0.5)])              # added
report("pruned_by_hand", tfmot.sparsity.keras.strip_pruning(pruned), base)
