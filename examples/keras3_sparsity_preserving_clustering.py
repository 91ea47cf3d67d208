"""Keras 3 (`import keras`): Prune -> sparsity-preserving Cluster -> PTQ int8 through
collaborative_fit (the Keras 3 engine is chosen from the model)."""
import keras_colopt as colopt
from _common import baseline, report, x, xt, y, yt

model, base = baseline(keras3=True)
result = colopt.collaborative_fit(
    model, x, y, phases=[colopt.Prune(sparsity=0.5, epochs=3), colopt.Cluster(clusters=8, epochs=3)],
    validation_data=(xt, yt), batch_size=32, verbose=0)
report("keras3_sparse_clustered_ptq", result.model, base)
