"""A collaborative_fit run that can kill itself (SIGKILL) at a chosen point; used by
test_checkpoint.py to check that re-running the same call resumes it.

    python resume_run.py OUT [--kill-epoch E --kill-batch B] [--kill-in-save N]

Writes OUT/result.npz (final weights) and OUT/history.json when the run completes.
"""

import argparse
import json
import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import checkpoint, data  # noqa: E402

from conftest import tiny_sequential  # noqa: E402

PHASES = [colopt.Train(epochs=1), colopt.Prune(sparsity=0.5, epochs=2),
          colopt.Cluster(clusters=4, epochs=1), colopt.Quantize(epochs=1)]


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kill-epoch", type=int)
    ap.add_argument("--kill-batch", type=int, default=0)
    ap.add_argument("--kill-in-save", type=int, help="SIGKILL while writing the manifest "
                                                      "of this many epochs done")
    args = ap.parse_args()
    if args.kill_in_save is not None:
        real = checkpoint.write_atomic

        def dying_write(path, payload):
            if path.endswith("manifest.json") and \
                    json.loads(payload)["epochs_done"] == args.kill_in_save:
                # What write_atomic leaves when killed mid-write: half a temporary file.
                tmp = os.path.join(os.path.dirname(path), ".colopt-killed.json")
                with open(tmp, "w") as f:
                    f.write(payload[: len(payload) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, payload)
        checkpoint.write_atomic = dying_write
    (x, y), (xt, yt) = data.load_digits()
    callbacks = [KillAt(args.kill_epoch, args.kill_batch)] if args.kill_epoch is not None else []
    rates = []  # each phase's learning-rate line: a resumed phase keeps the rate it chose

    class Rates(logging.Handler):
        def emit(self, record):
            if "learning rate" in record.getMessage():
                rates.append(record.getMessage())
    logging.getLogger("keras_colopt").addHandler(Rates())
    logging.getLogger("keras_colopt").setLevel(logging.INFO)
    result = colopt.collaborative_fit(
        tiny_sequential(), x[:256], y[:256], phases=PHASES, validation_data=(xt[:64], yt[:64]),
        batch_size=32, shuffle=False, verbose=0, callbacks=callbacks,
        log_dir=os.path.join(args.out, "logs"), checkpoint_dir=os.path.join(args.out, "ckpt"))
    np.savez(os.path.join(args.out, "result.npz"), *result.model.get_weights())
    with open(os.path.join(args.out, "history.json"), "w") as f:
        stats = colopt.callbacks.layer_stats(result.model)
        json.dump({"epoch": result.history.epoch, "phase": result.history.history["phase"],
                   "loss": result.history.history["loss"], "resumed_at": result.resumed_at,
                   "rates": rates,
                   "layers": {n: [s.sparsity, s.unique_per_channel_max]
                              for n, s in stats.items()}}, f)


if __name__ == "__main__":
    main()
