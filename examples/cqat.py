"""Cluster-preserving QAT, per tensor and per channel (tfmot tutorial: cluster_weights, strip,
quantize_apply(Default8BitClusterPreserveQuantizeScheme), check unique values, int8)."""
import keras_colopt as colopt
from _common import baseline, report, x, xt, y, yt

model, base = baseline()
for per_channel in (False, True):
    result = colopt.collaborative_fit(
        model, x, y, phases=[colopt.Cluster(clusters=8, epochs=3, per_channel=per_channel),
                             colopt.Quantize(epochs=2)],
        validation_data=(xt, yt), batch_size=32, verbose=0)
    report("cqat_per_channel" if per_channel else "cqat", result.model, base)
