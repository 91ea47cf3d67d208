"""Per-epoch checkpoints of a `collaborative_fit` run, and resuming from them.

A checkpoint folder holds:
  manifest.json      the commit point: the run's fingerprint, the position in the plan
                     (phase, epochs done), the history so far, which state to restore;
  entry-<k>.npz      the plain (stripped) weights the run had when phase k began: phase k's
                     wrappers are rebuilt from them (a clustering or cluster-preserving
                     QAT wrapper's variables depend on the weights it wraps);
  state-<epochs>/    a `tf.train.Checkpoint` of the wrapped model (masks, pruning step,
                     centroids, quantizer ranges) and its optimizer.
Every file is written under a temporary name and renamed; the manifest is written last, so
a kill at any moment leaves the previous checkpoint usable. Leftovers of an interrupted
write are removed when the folder is next opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import numpy as np

from keras_colopt._files import json_default, make_writable_folder, write_atomic

log = logging.getLogger("keras_colopt")

FORMAT = 1
MANIFEST = "manifest.json"


class CheckpointMismatch(ValueError):
    """A checkpoint folder holds another run (a different plan, model or data size)."""


@dataclasses.dataclass
class Position:
    """Where a checkpointed run stands: `epochs_done` epochs completed, in phase `phase`."""

    phase: int
    epochs_done: int
    state: str
    history: Dict[str, list]
    epochs: List[int]
    labels: List[str]


def fingerprint(plan, model, steps_per_epoch: int, initial_phase: int,
                distill: Optional[dict] = None) -> dict:
    """What must match for a checkpoint to continue this run (`distill`: the distillation's
    settings, when the run distils)."""
    phases = [{"kind": type(p.phase).__name__, "config": _plain(p.phase.get_config())}
              for p in plan]
    arch = architecture(model)
    shapes = [list(map(int, w.shape)) for w in model.weights]
    out = {"phases": phases,
           "model": hashlib.sha256((arch + json.dumps(shapes)).encode()).hexdigest()[:16],
           "model_name": model.name, "steps_per_epoch": int(steps_per_epoch),
           "initial_phase": int(initial_phase)}
    if distill is not None:
        out["distill"] = distill
    return out


def architecture(model) -> str:
    """The model's architecture as a string that is the same for the same architecture built
    again (names anonymized, `_anonymous`): what checkpoints and explore's state compare."""
    return json.dumps(_anonymous(_plain(model.get_config())), sort_keys=True, default=str)


def _anonymous(config):
    """`config` with every name replaced by its order of first appearance: the same
    architecture built again in one process gets new automatic names (`dense_3`,
    `input_layer_2`), and it must still resume its checkpoint; what the names connect
    (a Functional model's inbound nodes) still counts."""
    names: Dict[str, str] = {}

    def collect(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("name"), str):
                names.setdefault(obj["name"], f"<{len(names)}>")
            for v in obj.values():
                collect(v)
        elif isinstance(obj, list):
            for v in obj:
                collect(v)

    def rename(obj):
        if isinstance(obj, dict):
            return {k: rename(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rename(v) for v in obj]
        return names.get(obj, obj) if isinstance(obj, str) else obj

    collect(config)
    return rename(config)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if callable(obj):
        return f"<callable {getattr(obj, '__qualname__', type(obj).__name__)}>"
    if type(obj).__repr__ is object.__repr__:  # e.g. Quantize(quantize_configs=...)'s objects:
        return f"<{type(obj).__qualname__}>"  # by class, as their repr holds an address
    return obj


def _differences(saved: dict, now: dict) -> List[str]:
    out = []
    if saved.get("phases") != now["phases"]:
        out.append(f"the phases differ: checkpoint {_describe(saved.get('phases'))}, this "
                   f"call {_describe(now['phases'])}")
    if saved.get("model") != now["model"]:
        out.append(f"the model differs (checkpoint: '{saved.get('model_name')}', this call: "
                   f"'{now['model_name']}', architecture or weight shapes changed)")
    if saved.get("steps_per_epoch") != now["steps_per_epoch"]:
        out.append(f"steps per epoch differ (checkpoint {saved.get('steps_per_epoch')}, this "
                   f"call {now['steps_per_epoch']}): the data or batch size changed, and the "
                   "pruning schedule is laid out in steps")
    if saved.get("initial_phase") != now["initial_phase"]:
        out.append(f"initial_phase differs ({saved.get('initial_phase')} vs "
                   f"{now['initial_phase']})")
    if saved.get("distill") != now.get("distill"):
        out.append(f"the distillation differs (checkpoint {saved.get('distill')}, this call "
                   f"{now.get('distill')})")
    return out


def _describe(phases) -> str:
    parts = []
    for p in phases or []:
        args = ", ".join(f"{k}={v!r}" for k, v in p["config"].items() if v is not None)
        parts.append(f"{p['kind']}({args})")
    return "[" + ", ".join(parts) + "]"


def saved_meta(folder) -> dict:
    """What the run that wrote `folder` noted beside its checkpoint (e.g. its `log_dir`),
    or {} when there is no readable checkpoint there."""
    try:
        with open(os.path.join(os.fspath(folder), MANIFEST)) as f:
            return dict(json.load(f).get("meta") or {})
    except (OSError, ValueError):
        return {}


class RunCheckpoint:
    """One run's checkpoint folder (see the module docstring)."""

    def __init__(self, folder, meta: Optional[dict] = None):
        if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
            raise ValueError(f"`checkpoint_dir` must be a folder path. Received: "
                             f"checkpoint_dir={folder!r}")
        self.folder = os.path.abspath(os.fspath(folder))
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ValueError(f"`checkpoint_dir` {self.folder!r} exists and is not a folder. "
                             "Expected a folder (created if missing). Pick another path.")
        make_writable_folder(self.folder, "`checkpoint_dir`", "checkpoints (`checkpoint_dir`)")
        self.manifest: Optional[dict] = None
        self.fp: Optional[dict] = None
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ open
    def open(self, fp: dict) -> Optional[Position]:
        """Checks the folder against this run; returns where to resume, or None (fresh)."""
        self.fp = fp
        path = os.path.join(self.folder, MANIFEST)
        if not os.path.exists(path):
            if any(n.startswith(("state-", "entry-")) for n in os.listdir(self.folder)):
                raise CheckpointMismatch(
                    f"{self.folder!r} holds checkpoint files but no {MANIFEST}: it is not a "
                    "checkpoint folder this library can continue. Expected an empty folder or "
                    "one written by collaborative_fit. Use another checkpoint_dir.")
            return None
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointMismatch(f"{path!r} cannot be read ({e}). Expected a manifest "
                                     "written by collaborative_fit. Use another "
                                     "checkpoint_dir.") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointMismatch(f"{path!r} has format {manifest.get('format')!r}; this "
                                     f"version reads format {FORMAT}. Use another "
                                     "checkpoint_dir.")
        diffs = _differences(manifest.get("fingerprint", {}), fp)
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint_dir {self.folder!r} holds another run, refusing to mix it with "
                "this one: " + "; ".join(diffs) + ". Expected the same model, phases and data "
                "as the run that wrote it. Re-run that exact call to resume it, or use a new "
                "checkpoint_dir for this one.")
        self.manifest = manifest
        self._clean()
        return Position(phase=manifest["phase"], epochs_done=manifest["epochs_done"],
                        state=manifest["state"], history=manifest["history"],
                        epochs=manifest["epochs"], labels=manifest["labels"])

    def _clean(self):
        """Removes what an interrupted write left, and states the manifest no longer uses."""
        keep = {MANIFEST}
        if self.manifest:
            keep |= {self.manifest["state"]} | {f"entry-{k}.npz" for k in
                                               self.manifest.get("entries", [])}
        for name in os.listdir(self.folder):
            if name in keep:
                continue
            if name.startswith((".colopt-", "state-", "entry-")):
                target = os.path.join(self.folder, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    os.unlink(target)

    # ------------------------------------------------------------------ entry weights
    def save_entry(self, phase: int, weights: List[np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, *weights)
        write_atomic(os.path.join(self.folder, f"entry-{phase}.npz"), buf.getvalue())

    def load_entry(self, phase: int) -> List[np.ndarray]:
        with np.load(os.path.join(self.folder, f"entry-{phase}.npz"), allow_pickle=False) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]

    # ------------------------------------------------------------------ states
    def save(self, model, phase: int, epochs_done: int, history: Dict[str, list],
             epochs: List[int], labels: List[str]) -> str:
        """Writes the model+optimizer state (through the model's engine), then the manifest
        that points at it."""
        from keras_colopt.engines import engine_of

        name = f"state-{epochs_done:05d}"
        tmp = tempfile.mkdtemp(prefix=".colopt-state-", dir=self.folder)
        try:
            engine_of(model).save_state(model, os.path.join(tmp, "ckpt"))
            final = os.path.join(self.folder, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest = {
            "format": FORMAT, "fingerprint": self.fp, "phase": phase,
            "epochs_done": epochs_done, "state": name,
            "entries": [phase],
            "history": history, "epochs": epochs, "labels": labels, "meta": self.meta}
        write_atomic(os.path.join(self.folder, MANIFEST),
                     json.dumps(self.manifest, indent=1, default=json_default))
        self._clean()
        return name

    def restore(self, model, state: str) -> None:
        """Loads a saved state into `model` (built for the same phase) and its optimizer."""
        from keras_colopt.engines import engine_of

        engine_of(model).restore_state(model, os.path.join(self.folder, state, "ckpt"))

