"""What `explore` keeps under `<out_dir>/state`, so that the same call again, after a crash,
a pre-emption or a kill, goes on from the nodes and leaves already done.

```
state/explore.json          the call's fingerprint (model, data sizes, settings); search.json
                            for a `search` call, which keeps its nodes the same way
state/nodes/<node>.npz      a trained node's weights ...
state/nodes/<node>.json     ... its architecture and accuracy (written last: the commit point)
state/leaves/<leaf>.npz     a quantization-aware leaf's kernels (the density plot's stage)
state/leaves/<leaf>.json    a measured leaf's results (written last)
```
Every file is written atomically (`write_atomic`: a temporary file, fsync, rename), so a kill
at any moment leaves each node and leaf either whole or absent. A failed leaf or node is not
kept: the next call tries it again. A call whose model, data sizes or settings differ from
the saved fingerprint is refused before any training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
from typing import Dict, Optional

import numpy as np

from keras_colopt import checkpoint
from keras_colopt._files import json_default, write_atomic
from keras_colopt.report import LeafResult

log = logging.getLogger("keras_colopt")

FORMAT = 1
# fit arguments that change what is trained (the others: callbacks, verbosity, ...)
_TRAINING_ARGS = ("batch_size", "rate_policy", "distill", "class_weight", "sample_weight",
                  "shuffle", "steps_per_epoch", "strategy")


class StateMismatch(checkpoint.CheckpointMismatch):
    """`out_dir` holds the saved nodes and leaves of a different `explore` call."""


def fingerprint(model, n_train: Optional[int], n_val: int, settings: dict,
                fit_args: dict) -> dict:
    """What must match for saved nodes and leaves to be reused: the model's architecture and
    weights, the number of training and validation samples, the phases and fit settings."""
    digest = hashlib.sha256(checkpoint.architecture(model).encode())
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    args = {k: checkpoint._plain(_stable(fit_args[k])) for k in _TRAINING_ARGS
            if fit_args.get(k) is not None}
    return {"format": FORMAT, "model": digest.hexdigest()[:16], "model_name": model.name,
            "train_samples": n_train, "validation_samples": int(n_val),
            "settings": json.loads(json.dumps(checkpoint._plain(settings), default=repr)),
            "fit": json.loads(json.dumps(args, default=repr))}


def _stable(value):
    """A fit argument as it can be compared across processes: an object with a config (a
    `Distill`: its teacher by name) by its config, an array by its shape."""
    if callable(getattr(value, "get_config", None)):
        return {"class": type(value).__name__, **value.get_config()}
    if isinstance(value, np.ndarray):
        return {"array": list(value.shape)}
    return value


def _differences(saved: dict, now: dict) -> list:
    names = {"model": f"the model (saved: '{saved.get('model_name')}', this call: "
                      f"'{now['model_name']}'; architecture or weights changed)",
             "train_samples": f"the training samples ({saved.get('train_samples')} saved, "
                              f"{now['train_samples']} now)",
             "validation_samples": f"the validation samples ({saved.get('validation_samples')}"
                                   f" saved, {now['validation_samples']} now)",
             "settings": f"the phases (saved {saved.get('settings')}, now {now['settings']})",
             "fit": f"the fit arguments (saved {saved.get('fit')}, now {now['fit']})",
             "format": "the state's format"}
    return [text for key, text in names.items() if saved.get(key) != now[key]]


def slug(name: str) -> str:
    """A node's or leaf's name as a file name ("Pruned+PTQ" -> "pruned_ptq")."""
    return name.lower().replace("+", "_")


class TreeState:
    """The nodes and leaves of one `explore` call saved under `<out_dir>/state`."""

    def __init__(self, out_dir: str, fp: dict, kind: str = "explore"):
        self.folder = os.path.join(out_dir, "state")
        self.kind = kind
        for sub in ("nodes", "leaves"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        path = os.path.join(self.folder, f"{kind}.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            diff = _differences(saved, fp)
            if diff:
                raise StateMismatch(
                    f"{kind}: {self.folder} holds the nodes and leaves of a different call: "
                    + "; ".join(diff) + ". Expected the same model, data sizes and settings to "
                    "reuse them. Pass another out_dir, or delete that folder to start over.")
        else:
            write_atomic(path, json.dumps(fp, indent=2, default=json_default).encode())

    def _path(self, kind: str, name: str, ext: str) -> str:
        return os.path.join(self.folder, kind, f"{slug(name)}.{ext}")

    # ------------------------------------------------------------------ nodes
    def save_node(self, name: str, model, fp32_accuracy: float) -> None:
        buf = io.BytesIO()
        np.savez(buf, *[np.asarray(w) for w in model.get_weights()])
        write_atomic(self._path("nodes", name, "npz"), buf.getvalue())
        cls = type(model)
        meta = {"class": f"{cls.__module__}:{cls.__qualname__}", "config": model.get_config(),
                "fp32_accuracy": fp32_accuracy}
        write_atomic(self._path("nodes", name, "json"),
                     json.dumps(meta, default=json_default).encode())

    def load_node(self, name: str, rebuild):
        """`(model, fp32_accuracy)` of a saved node (`rebuild`: the engine's, taking
        `(class, config, weights)`), or None when the node is not saved or does not load."""
        path = self._path("nodes", name, "json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                meta = json.load(f)
            module, _, qualname = meta["class"].partition(":")
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            with np.load(self._path("nodes", name, "npz")) as z:
                weights = [z[f"arr_{i}"] for i in range(len(z.files))]
            return rebuild((cls, meta["config"], weights)), float(meta["fp32_accuracy"])
        except Exception as e:  # noqa: BLE001 - the node is trained again, and it is said
            log.warning("%s: the saved %s node in %s could not be loaded (%s: %s); it is "
                        "trained again.", self.kind, name, self.folder, type(e).__name__, e)
            return None

    # ------------------------------------------------------------------ leaves
    def save_leaf(self, result: LeafResult, kernels: Optional[Dict[str, np.ndarray]]) -> None:
        if kernels:
            buf = io.BytesIO()
            np.savez(buf, **kernels)
            write_atomic(self._path("leaves", result.name, "npz"), buf.getvalue())
        write_atomic(self._path("leaves", result.name, "json"),
                     json.dumps(dataclasses.asdict(result), default=json_default).encode())

    def load_leaf(self, name: str):
        """`(LeafResult, kernels or None)` of a measured leaf whose files are all still
        there, or None."""
        path = self._path("leaves", name, "json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            fields = json.load(f)
        known = {f.name for f in dataclasses.fields(LeafResult)}
        result = LeafResult(**{k: v for k, v in fields.items() if k in known})
        if not result.tflite or not os.path.exists(result.tflite):
            log.info("%s: %s was measured by an earlier call, but its file %s is gone; "
                     "it is built again.", self.kind, name, result.tflite)
            return None
        kernels = None
        if os.path.exists(self._path("leaves", name, "npz")):
            with np.load(self._path("leaves", name, "npz")) as z:
                kernels = {k: z[k] for k in z.files}
        return result, kernels
