"""Prune-preserving QAT (tfmot tutorial: prune, strip, quantize_annotate_model,
quantize_apply(Default8BitPrunePreserveQuantizeScheme), check sparsity, int8)."""
import keras_colopt as colopt
from _common import baseline, report, x, xt, y, yt

model, base = baseline()
result = colopt.collaborative_fit(
    model, x, y, phases=[colopt.Prune(sparsity=0.5, epochs=3), colopt.Quantize(epochs=2)],
    validation_data=(xt, yt), batch_size=32, verbose=0)
report("pqat", result.model, base)
