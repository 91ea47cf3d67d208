"""An explore call that can kill itself (SIGKILL) when a chosen fit begins; used by
test_explore_resume.py to check that the same call again reuses what was finished.

    python explore_run.py OUT [--kill-at-fit N] [--sparsity S]

Its report is OUT/tree/report.json (explore writes it).
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data  # noqa: E402

from conftest import tiny_sequential  # noqa: E402

LEAVES = ["PTQ", "Pruned+PTQ", "PQAT"]
FITS = []  # each fit's on_train_begin, across every collaborative_fit of the walk


class KillAtFit(keras.callbacks.Callback):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def on_train_begin(self, logs=None):
        FITS.append(1)
        if len(FITS) == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kill-at-fit", type=int)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    (x, y), (xt, yt) = data.load_digits()
    callbacks = [KillAtFit(args.kill_at_fit)] if args.kill_at_fit else []
    colopt.explore(tiny_sequential(), x[:256], y[:256], validation_data=(xt[:64], yt[:64]),
                   out_dir=os.path.join(args.out, "tree"), leaves=LEAVES,
                   prune=colopt.Prune(args.sparsity, epochs=1),
                   quantize=colopt.Quantize(epochs=1), batch_size=64, latency_runs=2,
                   rate_policy="compiled", shuffle=False, callbacks=callbacks)


if __name__ == "__main__":
    main()
