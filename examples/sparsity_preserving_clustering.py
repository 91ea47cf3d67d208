"""Sparsity-preserving clustering (tfmot tutorial: prune, strip, cluster_weights with
preserve_sparsity=True, strip, check sparsity and clusters, PTQ int8)."""
import keras_colopt as colopt
from _common import baseline, report, x, xt, y, yt

model, base = baseline()
result = colopt.collaborative_fit(
    model, x, y, phases=[colopt.Prune(sparsity=0.5, epochs=3), colopt.Cluster(clusters=8, epochs=3)],
    validation_data=(xt, yt), batch_size=32, verbose=0)
report("sparse_clustered_ptq", result.model, base)
