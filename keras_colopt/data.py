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
    """The demo's small CNN for 8x8x1 digits (compiled; a Keras 3 model, built by the
    default engine)."""
    from keras_colopt.engines import default_engine

    return default_engine().demo_model(seed)


NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")


def load_npz(path, require_validation: bool = False):
    """Loads a user's dataset file for the command line.

    The `.npz` (from `np.savez(path, x_train=..., y_train=..., x_val=...,
    y_val=...)`) holds `x_train` and `y_train`, and optionally `x_val` and
    `y_val`; nothing else. Object arrays are refused (they would need pickle).

    Returns:
        `((x_train, y_train), (x_val, y_val) or None)`.
    """
    import os
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No data file at {path!r}. Expected a .npz written with "
                                "np.savez(path, x_train=..., y_train=..., x_val=..., y_val=...).")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path!r} is not a readable .npz of plain arrays ({e}). Expected a "
                         "file written with np.savez(path, x_train=..., y_train=..., "
                         "x_val=..., y_val=...).") from None
    keys = set(arrays)
    missing = [k for k in ("x_train", "y_train") if k not in keys]
    if require_validation:
        missing += [k for k in ("x_val", "y_val") if k not in keys]
    extra = sorted(keys - set(NPZ_KEYS))
    half = ("x_val" in keys) != ("y_val" in keys)
    if missing or extra or half:
        raise ValueError(f"{path!r} has arrays {sorted(keys)}. Expected exactly x_train, "
                         f"y_train{', x_val, y_val' if require_validation else ''} "
                         f"{'' if require_validation else '(and optionally x_val, y_val)'}"
                         f"; missing: {missing or 'none'}, unexpected: {extra or 'none'}"
                         f"{', x_val and y_val must come together' if half else ''}. "
                         "Rename the arrays in np.savez(...).")
    scalars = sorted(k for k, v in arrays.items() if v.ndim == 0)
    if scalars:
        raise ValueError(f"{path!r}: {scalars} hold a single number, not samples. Expected "
                         "arrays whose first axis is the sample axis.")
    for a, b in (("x_train", "y_train"), ("x_val", "y_val")):
        if a in arrays and len(arrays[a]) != len(arrays[b]):
            raise ValueError(f"{path!r}: {a} has {len(arrays[a])} samples but {b} has "
                             f"{len(arrays[b])}. Expected one label per input.")
        if a in arrays and len(arrays[a]) == 0:
            raise ValueError(f"{path!r}: {a} is empty. Expected at least one sample.")
    val = (arrays["x_val"], arrays["y_val"]) if "x_val" in arrays else None
    return (arrays["x_train"], arrays["y_train"]), val
