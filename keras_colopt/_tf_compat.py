"""Every private module of TensorFlow Lite that the
engine-neutral modules (`export`) touch, each behind one small accessor, and why no public
API does.

Each entry of `PRIVATE` is `accessor name -> (what it touches, why)`; the engines keep
their own tables (`engines/keras3/compat.py`, `engines/tfmot/compat.py`).
`tests/test_compat.py` runs one test per entry on a tiny converted `.tflite`, so a
TensorFlow or LiteRT upgrade that renames or changes one fails there, by the accessor's
name, and it greps the package for a private name used anywhere else.

When one breaks after an upgrade: find how the new release does the same thing (the
module's new home, or a public API that now covers it), change only the accessor here
(keeping what it returns), and check the entry's test again. The modules are imported when
called, as `export` did: importing the package does not load them.
"""

from __future__ import annotations

PRIVATE = {
    "tflite_schema": (
        "tensorflow.lite.python.schema_py_generated",
        "the generated .tflite flatbuffer schema: the names of the BuiltinOperator and "
        "TensorType codes a file stores (no public API maps them)."),
    "flatbuffer_utils": (
        "tensorflow.lite.tools.flatbuffer_utils",
        "read_model(path): a .tflite read as the schema's objects (operators, tensors, "
        "buffers) without running it; not part of TensorFlow's public `tf.lite` API."),
}


def tflite_schema():
    """TensorFlow's generated `.tflite` schema module
    (`tensorflow.lite.python.schema_py_generated`): `BuiltinOperator` and `TensorType` hold
    the codes a file stores as class attributes, name -> code."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def flatbuffer_utils():
    """TensorFlow's `.tflite` flatbuffer tools (`tensorflow.lite.tools.flatbuffer_utils`):
    `read_model(path)` returns the schema's ModelT (operatorCodes, subgraphs, buffers)."""
    from tensorflow.lite.tools import flatbuffer_utils as tools

    return tools
