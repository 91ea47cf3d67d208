"""Sparsity- and cluster-preserving QAT (tfmot tutorial: prune, strip, sparsity-preserving
cluster_weights, strip, quantize_apply(Default8BitClusterPreserveQuantizeScheme(True)), int8)."""
import keras_colopt as colopt
from _common import baseline, report, x, xt, y, yt

model, base = baseline()
result = colopt.collaborative_fit(
    model, x, y, phases=[colopt.Prune(sparsity=0.5, epochs=3), colopt.Cluster(clusters=8, epochs=3),
                         colopt.Quantize(epochs=2)],
    validation_data=(xt, yt), batch_size=32, verbose=0, log_dir=f"{__import__('_common').OUT}/logs")
report("pcqat", result.model, base)
