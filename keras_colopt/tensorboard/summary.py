"""Writes what the dashboard shows, as TensorBoard summaries owned by its plugin.

Each summary is a JSON document in a string tensor (`DATA_CLASS_TENSOR`, plugin
`keras_colopt`), written into `<log_dir>/colopt`, the run's own folder beside Keras'
`train/`, `validation/` and `compression/` (whose tags stay as they are):

- `epoch/<epoch>` (step: the epoch), by `CompressionMetrics`: every layer with a kernel, in
  model order, by its full (nested) name: weights, sparsity, unique values per tensor, the
  largest count of unique values in one output channel; and what the model's wrappers do.
- `invariants/<epoch>/<guard>` (step: the epoch), by `InvariantGuard`: per checked layer what
  is expected (sparsity, clusters, per channel) and what was found, and the violations.
- `plan` (step: the first epoch), by `collaborative_fit` and `CollaborativeOptimization`: the
  phases, their labels and epoch ranges.
- `tflite/<file name>`, by `export.to_tflite(..., log_dir=...)`: per layer, what survived in
  the `.tflite` (sparsity, values per channel, bytes, gzip bytes).
- `explore/leaves`, by `explore`: its report (every leaf, the chosen one, the targets).

One event file per folder is open at a time in a process (every writer of a folder shares
it), flushed after every summary: TensorBoard reads a folder's event files in name order, and
two files written at once would be read out of order. Files are named to sort in the order
they are made. Pure Python (TensorBoard's record writer): no TensorFlow op is run.
"""

from __future__ import annotations

import atexit
import itertools
import json
import math
import os
import socket
import threading
import time
from typing import Dict, Iterable, Optional

import numpy as np

from keras_colopt.tensorboard import metadata

_lock = threading.Lock()
_open: Dict[str, "_EventFile"] = {}
_sequence = itertools.count()


def folder_of(log_dir) -> str:
    """Where the dashboard's summaries of the run logged to `log_dir` go."""
    return os.path.join(os.fspath(log_dir), metadata.RUN_FOLDER)


class _EventFile:
    """One event file of a folder."""

    def __init__(self, folder: str):
        from tensorboard.compat import tf
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        tf.io.gfile.makedirs(folder)
        # Seconds, then a process-wide sequence of fixed width: a later file sorts later.
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_sequence):06d}.colopt")
        self.path = os.path.join(folder, name)
        self._records = RecordWriter(tf.io.gfile.GFile(self.path, "wb"))
        self._event_pb2 = event_pb2
        self.tags = set()
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _add(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def write(self, tag: str, text: str, step: int, kind: str) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=metadata.PLUGIN_NAME, content=metadata.content(kind)),
            data_class=summary_pb2.DATA_CLASS_TENSOR)
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                        string_val=[text.encode("utf-8")])
        value = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)
        self._add(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=[value])))
        self.tags.add(tag)

    def close(self) -> None:
        self._records.close()


def _plain(value):
    """`value` with numpy numbers as Python ones and NaN/inf as None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def write(log_dir, tag: str, value: dict, step: int, unique: bool = False) -> str:
    """Writes one dashboard summary of the run logged to `log_dir` and flushes it.

    The functions below (`epoch`, `invariants`, `plan`, `tflite`, `leaves`) are what the
    library calls; this is the one place they go through.

    Args:
        log_dir: the run's log directory (the one given to `CompressionMetrics`).
        tag: a tag of `metadata` (`metadata.epoch_tag(3)`, ...).
        value: a JSON-able dict (numpy numbers are converted; NaN and inf become null).
        step: the summary's step (the epoch for per-epoch summaries).
        unique: when this process already wrote `tag` into the folder's open file, write
            it as `tag~2`, `tag~3`, ... (two guards checking the same epoch).

    Returns:
        The tag written.

    Example:
        >>> write("logs/run1", metadata.epoch_tag(3), {"epoch": 3, "layers": []}, 3)
        'epoch/000003'
    """
    kind = metadata.kind_of(tag.split("~")[0])
    if kind is None:
        raise ValueError(f"Unknown dashboard tag {tag!r}. Expected a tag made by "
                         "keras_colopt.tensorboard.metadata.")
    text = json.dumps(_plain(dict(value, version=metadata.VERSION)), allow_nan=False)
    folder = folder_of(log_dir)
    with _lock:
        f = _open.get(folder)
        if f is None:
            f = _open[folder] = _EventFile(folder)
        if unique and tag in f.tags:
            tag = next(f"{tag}~{n}" for n in itertools.count(2) if f"{tag}~{n}" not in f.tags)
        f.write(tag, text, step, kind)
    return tag


def close(log_dir) -> None:
    """Closes the open event file of `log_dir`'s dashboard folder, if any (a later summary
    opens a new one)."""
    with _lock:
        f = _open.pop(folder_of(log_dir), None)
    if f is not None:
        f.close()


@atexit.register
def close_all() -> None:
    with _lock:
        files = list(_open.values())
        _open.clear()
    for f in files:
        f.close()


# ---------------------------------------------------------------------------- what is written
def epoch(log_dir, epoch: int, layer_stats: dict, per_channel: Iterable[str] = (),
          wrappers: Optional[str] = None) -> str:
    """One epoch's per-layer statistics (`kernels.layer_stats`), in model order.

    Args:
        log_dir: the run's log directory.
        epoch: the epoch (0-based, on the run's one axis across phases).
        layer_stats: `{layer path name: stats.TensorStats}` in model order.
        per_channel: the layers whose clusters count per output channel.
        wrappers: what the model's wrappers do ("prune", "PCQAT", "none", ...), the phase
            shown for an epoch no plan covers.

    Returns:
        The tag written (`epoch/000003`).
    """
    per_channel = set(per_channel)
    layers = [{"name": name, "size": s.size, "zeros": s.zeros, "sparsity": s.sparsity,
               "unique": s.unique, "unique_per_channel": s.unique_per_channel_max,
               "per_channel": name in per_channel, "shape": list(s.shape)}
              for name, s in layer_stats.items()]
    return write(log_dir, metadata.epoch_tag(epoch),
                 {"epoch": int(epoch), "wrappers": wrappers, "layers": layers}, epoch)


def invariants(log_dir, epoch: int, source: str, phase: Optional[str], layers: list,
               tolerance: float) -> str:
    """One guard's check at one epoch: `layers` is `[{"name", "expected": {...},
    "found": {...}, "violations": [...]}]` in model order (see `InvariantGuard`)."""
    return write(log_dir, metadata.invariants_tag(epoch, source),
                 {"epoch": int(epoch), "phase": phase, "source": source,
                  "tolerance": tolerance, "layers": layers,
                  "violations": sum(len(L["violations"]) for L in layers)},
                 epoch, unique=True)


def plan(log_dir, plan) -> str:
    """The resolved `Plan`: each phase's label, kind, epoch range and targets."""
    phases = [{"index": p.index, "label": p.label, "kind": p.phase.kind,
               "start": p.start_epoch, "end": p.end_epoch, "sparsity": p.sparsity,
               "clusters": p.clusters, "per_channel": p.per_channel,
               "preserve_sparsity": p.preserve_sparsity, "preserve_clusters": p.preserve_clusters}
              for p in plan.phases]
    start = phases[0]["start"] if phases else 0
    return write(log_dir, metadata.PLAN_TAG,
                 {"phases": phases, "total_epochs": plan.total_epochs}, start)


def tflite(log_dir, table: dict, step: int = 0) -> str:
    """What survived in one exported `.tflite` (`export.survival`)."""
    return write(log_dir, metadata.tflite_tag(os.path.basename(table["file"])), table, step)


def leaves(log_dir, report: dict, step: int) -> str:
    """`explore`'s report (`Report.as_dict()`), rewritten as leaves are built."""
    return write(log_dir, metadata.LEAVES_TAG, report, step)


# The folders a run writes its event files to, under its log_dir.
RUN_FOLDERS = ("train", "validation", "compression", metadata.RUN_FOLDER)


def restart_runs(log_dir, epoch: int) -> None:
    """Tells TensorBoard that this run's folders under `log_dir` (`RUN_FOLDERS`: Keras'
    train/ and validation/, compression/, the dashboard's colopt/) restart at `epoch`; any
    other folder there (another run's, in a shared parent) is left as it is.

    A kill after an epoch's summaries were written but before its checkpoint was would show
    that epoch twice. A `SessionLog.START` event at step `epoch` makes TensorBoard drop the
    events of steps >= `epoch` read before it (its `purge_orphaned_data`, on by default).
    TensorBoard reads a run's event files in name order, and names start with the creation
    second: the marker is named to sort after every existing file, and this waits until
    the clock has passed its second, so that the files written from now on sort after it.
    """
    import tempfile

    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    newest = 0
    for root in (os.path.join(os.fspath(log_dir), sub) for sub in RUN_FOLDERS):
        files = os.listdir(root) if os.path.isdir(root) else []
        events = [f for f in files if ".tfevents." in f]
        if not events:
            continue
        stamps = [int(p) for f in events for p in f.split(".tfevents.")[1].split(".")[:1]
                  if p.isdigit()]
        second = max(stamps + [int(time.time())])
        newest = max(newest, second)
        with tempfile.TemporaryDirectory(dir=root, prefix=".colopt-") as tmp:
            writer = EventFileWriter(tmp)
            # TensorBoard takes a run's first START for its beginning, not a restart (Keras
            # writes none), so the restart is the second one.
            for _ in range(2):
                writer.add_event(event_pb2.Event(
                    step=epoch, wall_time=time.time(),
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            writer.close()
            made = os.path.join(tmp, os.listdir(tmp)[0])
            os.replace(made, os.path.join(
                root, f"events.out.tfevents.{second:010d}.~restart.{os.getpid()}.{epoch}"))
    while newest and int(time.time()) <= newest:
        time.sleep(0.05)
