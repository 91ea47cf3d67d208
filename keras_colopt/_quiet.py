"""The command line prints only its own output: TensorFlow's native log lines are dropped.

TensorFlow and LiteRT write from C++ straight to file descriptors 1 and 2, below Python's
`sys.stdout`/`sys.stderr`: `I0000 ...`/`W0000 ...` lines at import, a `cuInit` error on a
machine without a GPU, "Created TensorFlow Lite XNNPACK delegate", the converter's
"fully_quantize: 0, ..." line. For `keras-colopt` (and `python -m keras_colopt`) only, the two
descriptors are passed through a filter that drops exactly those known lines and lets every
other byte through as it comes (progress bars included); real errors still reach the
terminal. Imports nothing heavy: it must run before TensorFlow is imported.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

NOISE = re.compile(
    rb"^(?:"
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} \S+ +\d+ [\w./-]+:\d+\] .*"  # absl INFO / WARNING
    rb"|E\d{4} \S+ +\d+ [\w./-]+:\d+\] (?:failed call to cuInit|Unable to "
    rb"register cu\w+ factory).*"  # no GPU here: not an error of ours
    rb"|To enable the following instructions: .*rebuild TensorFlow with the appropriate "
    rb"compiler flags\."
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    rb"|fully_quantize: \d, inference_type: \d+, input_inference_type: \w+, "
    rb"output_inference_type: \w+"
    rb")\r?\n?$")
# A partial line that may still become a noise line: held until its end arrives.
_MAYBE = re.compile(rb"^(?:[IWE]\d|WARNING: All|To enable|INFO: Created|fully_quantize)")


def is_command_line() -> bool:
    """Whether this process is the `keras-colopt` command (or `python -m keras_colopt`)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    return (os.path.basename(sys.argv[0] or "") == "keras-colopt"
            or any(a == "-m" and b == "keras_colopt" for a, b in zip(argv, argv[1:])))


class _Filter:
    """Descriptor `fd` redirected through a pipe; a thread copies what is not noise to the
    original destination."""

    def __init__(self, fd: int):
        self.fd = fd
        self.out = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name=f"colopt-quiet-{fd}",
                                       daemon=True)
        self.thread.start()

    def _pump(self):
        pending = b""
        while True:
            chunk = os.read(self.read, 65536)
            if not chunk:
                break
            pending += chunk
            lines = pending.splitlines(keepends=True)
            pending = lines.pop() if not lines[-1].endswith(b"\n") else b""
            kept = b"".join(line for line in lines if not NOISE.match(line))
            if pending and not _MAYBE.match(pending):
                kept, pending = kept + pending, b""  # e.g. a progress bar's "\r..." update
            if kept:
                os.write(self.out, kept)
        if pending and not NOISE.match(pending):
            os.write(self.out, pending)
        os.close(self.read)

    def close(self):
        os.dup2(self.out, self.fd)  # the pipe's last write end closes: the pump sees its end
        self.thread.join(timeout=5)
        os.close(self.out)


def install() -> None:
    """Filters descriptors 1 and 2 of this process until it exits (idempotent)."""
    global _filters
    if _filters:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # INFO/WARNING not even written
    sys.stdout.flush()
    sys.stderr.flush()
    _filters = [_Filter(1), _Filter(2)]

    def restore():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for f in _filters:
            f.close()
    atexit.register(restore)


_filters: list = []


def for_command_line() -> None:
    if is_command_line() and os.environ.get("KERAS_COLOPT_NATIVE_LOGS") != "1":
        install()
