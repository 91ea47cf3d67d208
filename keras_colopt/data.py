"""The embedded dataset: scikit-learn's handwritten digits (8x8, 10 classes).

It installs with the package (scikit-learn is a dependency; the data ships in
its wheel, BSD licence), so the demo and tests never download anything.
1,797 images; the split is fixed and stratified.
"""

from __future__ import annotations

import numpy as np


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """Returns `((x_train, y_train), (x_test, y_test))`.

    `x` is float32 of shape (n, 8, 8, 1) scaled to [0, 1]; `y` is int64 labels
    0-9. With the defaults: 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction,
                                              random_state=seed, stratify=y)
    return (x_tr, y_tr), (x_te, y_te)


def demo_model(seed: int = 0):
    """The demo's small CNN for 8x8x1 digits (compiled, tf_keras)."""
    import tf_keras as keras

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
