"""The sparsity-preserving Cluster phase of a MobileNetV2-like net: collaborative_fit vs the same
phase hand-written with tfmot, in training mode and in inference mode.

A small MobileNetV2-like net (Conv2D use_bias=False -> BatchNormalization(momentum=0.999, as
tf_keras.applications.MobileNetV2) -> ReLU6, DepthwiseConv2D, ZeroPadding2D, Add residuals) on
the embedded digits, upsampled to 16x16x1. The float baseline is trained, then its BN moving
statistics are calibrated (a few training-mode passes at momentum 0.9), so that it starts right in
inference mode. Then Prune 50 % (2 epochs) -> sparsity-preserving Cluster 8 (2 epochs, at the
compiled rate / 10, as collaborative_fit did when this was measured), three ways:

  ours            collaborative_fit(phases=[Prune, Cluster])
  tfmot (model)   prune_low_magnitude(model), strip, cluster_weights(model, preserve_sparsity)
                  (the tutorials' way: every layer wrapped, BatchNormalization included)
  tfmot (layers)  the same pruned model, cluster_weights on each Conv2D/Dense only

After each phase: accuracy on the training inputs in training mode (batch statistics, batches of
64; variables restored afterwards) and in inference mode, inference accuracy on the test split,
and how far the first BN's moving mean moved during the Cluster phase.

Run: python benchmarks/mobilenetv2_cluster_phase.py [--only ours] [--label TEXT]
"""

import argparse
import json
import os
import sys
import time

# This checkout's keras_colopt, not an installed one (a script's sys.path starts at benchmarks/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

import keras_colopt as colopt  # noqa: E402
from keras_colopt import data as colopt_data  # noqa: E402
from keras_colopt.engines import tfmot as engine  # noqa: E402

LR, BATCH, CLUSTERS = 1e-2, 64, 8
PRUNE_EPOCHS, CLUSTER_EPOCHS = 2, 2


def data():
    (x, y), (xt, yt) = colopt_data.load_digits()
    up = lambda a: np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)  # noqa: E731
    return (up(x), y), (up(xt), yt)


def bn(x, name):
    return keras.layers.BatchNormalization(momentum=0.999, epsilon=1e-3, name=name)(x)


def block(x, expand, out, stride, name):
    import origin_tables

    return origin_tables.mbv2_block(x, expand, out, stride, name, bn, keras=keras)


def mbv2_like(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 1))
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="conv1_pad")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, use_bias=False, name="conv1")(x)
    x = keras.layers.ReLU(6.0, name="conv1_relu")(bn(x, "bn_conv1"))
    x = block(x, 1, 8, 1, "b0")
    x = block(x, 6, 16, 2, "b1")
    x = block(x, 6, 16, 1, "b2")
    x = block(x, 6, 16, 1, "b3")
    x = keras.layers.Conv2D(64, 1, use_bias=False, name="conv_last")(x)
    x = keras.layers.ReLU(6.0, name="out_relu")(bn(x, "bn_last"))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="mbv2_like")


def compiled(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def calibrate_bn(model, x, passes=40):
    """Brings the BN moving statistics to the trained weights (momentum 0.999 would need
    thousands of steps): training-mode passes at momentum 0.9, then momentum back."""
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    for l in bns:
        l.momentum = 0.9
    rng = np.random.default_rng(0)
    for _ in range(passes):
        model(x[rng.choice(len(x), 256, replace=False)], training=True)
    for l in bns:
        l.momentum = 0.999


def acc(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def measure(model, x, y, xt, yt):
    """Accuracy on the training inputs in training and inference mode, and on the test split."""
    saved = [(v, v.numpy()) for v in model.variables]
    train_mode = np.concatenate([model(x[i:i + BATCH], training=True).numpy()
                                 for i in range(0, len(x), BATCH)])
    for v, value in saved:  # training-mode calls move BN statistics (and pruning steps)
        v.assign(value)
    return {"train_mode": acc(train_mode, y),
            "inference": acc(model.predict(x, batch_size=256, verbose=0), y),
            "test_inference": acc(model.predict(xt, batch_size=256, verbose=0), yt)}


def first_bn_mean(model):
    for layer in model.layers:
        base = engine.base_layer(layer)
        if isinstance(base, keras.layers.BatchNormalization):
            return base.moving_mean.numpy().copy()


class PhaseEnds(keras.callbacks.Callback):
    """Measures collaborative_fit's wrapped model at the end of each phase."""

    def __init__(self, digits):
        super().__init__()
        self.digits, self.rows, self.bn = digits, {}, {}

    def on_epoch_end(self, epoch, logs=None):
        (x, y), (xt, yt) = self.digits
        if epoch == PRUNE_EPOCHS - 1:
            self.rows["prune"] = measure(self.model, x, y, xt, yt)
        if epoch == PRUNE_EPOCHS + CLUSTER_EPOCHS - 1:
            self.rows["cluster"] = measure(self.model, x, y, xt, yt)
            self.rows["cluster"]["fit_accuracy_last_epoch"] = float(logs["accuracy"])
            self.bn["end"] = first_bn_mean(self.model)

    def on_train_begin(self, logs=None):
        if engine.wrapper_kind(self.model) == "cluster":
            self.bn["start"] = first_bn_mean(self.model)


def ours(baseline, digits):
    (x, y), _ = digits
    cb = PhaseEnds(digits)
    r = colopt.collaborative_fit(
        baseline, x, y, phases=[colopt.Prune(sparsity=0.5, epochs=PRUNE_EPOCHS),
                                colopt.Cluster(clusters=CLUSTERS, epochs=CLUSTER_EPOCHS,
                                               learning_rate=LR / 10)],  # as the tfmot rows
        batch_size=BATCH, verbose=0, callbacks=[cb])
    rows = cb.rows
    rows["cluster"]["bn_mean_moved"] = float(np.abs(cb.bn["end"] - cb.bn["start"]).max())
    stripped = engine.strip(r.model)
    rows["cluster"]["stripped_vs_wrapped_max_abs"] = float(np.abs(
        stripped.predict(x, verbose=0) - r.model.predict(x, verbose=0)).max())
    return rows


def tfmot_pipelines(baseline, digits):
    (x, y), (xt, yt) = digits
    steps = int(np.ceil(len(x) / BATCH))
    model = keras.models.clone_model(baseline)
    model.set_weights(baseline.get_weights())
    ramp = max(1, PRUNE_EPOCHS - 1) * steps
    frequency = max(1, ramp // 10)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=0.5, begin_step=0,
        end_step=(ramp // frequency) * frequency, frequency=frequency)
    pruned = compiled(tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule),
                      LR)
    pruned.fit(x, y, batch_size=BATCH, epochs=PRUNE_EPOCHS, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    after_prune = measure(pruned, x, y, xt, yt)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    params = dict(number_of_clusters=CLUSTERS, preserve_sparsity=True,
                  cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS)
    out = {}
    for how in ("model", "layers"):
        start = keras.models.clone_model(stripped)
        start.set_weights(stripped.get_weights())
        if how == "model":
            clustered = tfmot.clustering.keras.cluster_weights(start, **params)
        else:
            clustered = keras.models.clone_model(start, clone_function=lambda l: (
                tfmot.clustering.keras.cluster_weights(l, **params)
                if type(l) in (keras.layers.Conv2D, keras.layers.Dense) else l))
        compiled(clustered, LR / 10)  # collaborative_fit's default Cluster rate then
        before = first_bn_mean(clustered)
        h = clustered.fit(x, y, batch_size=BATCH, epochs=CLUSTER_EPOCHS, verbose=0)
        row = measure(clustered, x, y, xt, yt)
        row["fit_accuracy_last_epoch"] = float(h.history["accuracy"][-1])
        row["bn_mean_moved"] = float(np.abs(first_bn_mean(clustered) - before).max())
        out[how] = {"prune": after_prune, "cluster": row}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["ours", "tfmot"])
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    digits = data()
    (x, y), (xt, yt) = digits
    t0 = time.time()
    baseline = compiled(mbv2_like(), LR)
    baseline.fit(x, y, batch_size=32, epochs=8, verbose=0)
    calibrate_bn(baseline, x)
    res = {"baseline": measure(baseline, x, y, xt, yt)}
    if args.only != "tfmot":
        res["ours" + (f" {args.label}" if args.label else "")] = ours(baseline, digits)
    if args.only != "ours":
        for how, rows in tfmot_pipelines(baseline, digits).items():
            res[f"tfmot ({how})"] = rows
    res["seconds"] = time.time() - t0
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
