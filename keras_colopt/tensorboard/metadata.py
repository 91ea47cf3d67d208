"""What the writer and the plugin agree on: the plugin's name, the run folder, the tags.

Every summary of the dashboard is one JSON document in a string tensor, at one step, under
one tag. TensorBoard keeps only 10 values per tag for a plugin it does not know (its
reservoir sampling), so a value that is per epoch gets a tag per epoch (`epoch/000012`): no
epoch is ever sampled away, and the latest value of a tag is the one that counts.

Imports nothing heavy: TensorBoard loads the plugin, which imports this, at start-up.
"""

from __future__ import annotations

import json
import re
from typing import Optional

PLUGIN_NAME = "keras_colopt"
RUN_FOLDER = "colopt"  # <log_dir>/colopt, beside Keras' train/ and validation/, compression/
VERSION = 1

PLAN_TAG = "plan"
LEAVES_TAG = "explore/leaves"
_EPOCH = "epoch/"
_INVARIANTS = "invariants/"
_TFLITE = "tflite/"
KINDS = ("epoch", "invariants", "plan", "tflite", "leaves")


def epoch_tag(epoch: int) -> str:
    """The tag of one epoch's per-layer statistics."""
    return f"{_EPOCH}{int(epoch):06d}"


def invariants_tag(epoch: int, source: str) -> str:
    """The tag of one guard's check at one epoch; `source` tells guards apart (a phase label)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("_") or "guard"
    return f"{_INVARIANTS}{int(epoch):06d}/{slug}"


def tflite_tag(file_name: str) -> str:
    """The tag of one exported `.tflite` file's table (by its file name)."""
    return _TFLITE + file_name


def kind_of(tag: str) -> Optional[str]:
    """Which of `KINDS` a tag holds, or None for a tag this version does not know."""
    if tag == PLAN_TAG:
        return "plan"
    if tag == LEAVES_TAG:
        return "leaves"
    if tag.startswith(_EPOCH) and tag[len(_EPOCH):].isdigit():
        return "epoch"
    if tag.startswith(_INVARIANTS) and tag[len(_INVARIANTS):].split("/")[0].isdigit():
        return "invariants"
    if tag.startswith(_TFLITE) and len(tag) > len(_TFLITE):
        return "tflite"
    return None


def content(kind: str) -> bytes:
    """The `PluginData.content` of a summary: the format version and what it holds."""
    return json.dumps({"version": VERSION, "kind": kind}, sort_keys=True).encode()


def run_label(run: str) -> str:
    """How a TensorBoard run holding dashboard data is shown: `run-1/colopt` as `run-1` (the
    run's log dir), the `colopt` folder of the log dir TensorBoard was given as `.`."""
    if run == RUN_FOLDER:
        return "."
    for sep in ("/", "\\"):  # TensorBoard names runs by relative path, "\\" on Windows
        if run.endswith(sep + RUN_FOLDER):
            return run[:-len(RUN_FOLDER) - 1]
    return run
