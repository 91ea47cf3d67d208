"""Keras 3 (`import keras`), the way Keras users work: one plain model.fit whose
CollaborativeOptimization callback switches Train -> Prune -> Cluster -> PCQAT at the epoch
boundaries, on the user's own model object, then int8 from the QAT ranges."""
import keras

import keras_colopt as colopt
from _common import report, x, xt, y, yt

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((8, 8, 1)),
    keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
    keras.layers.DepthwiseConv2D(3, activation="relu", name="dw"),  # compressed too
    keras.layers.Conv2D(32, 1, activation="relu", name="pw"),
    keras.layers.GlobalAveragePooling2D(name="pool"),
    keras.layers.Dense(10, name="logits")])
model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=32, batch_size=32, validation_data=(xt, yt), verbose=0,
          callbacks=[colopt.callbacks.CollaborativeOptimization(
                         [colopt.Train(epochs=20), colopt.Prune(sparsity=0.5, epochs=6),
                          colopt.Cluster(clusters=8, epochs=4), colopt.Quantize(epochs=2)]),
                     colopt.callbacks.CompressionMetrics()])
report("keras3_one_fit", model)
