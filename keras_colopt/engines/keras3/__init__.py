"""The Keras 3 engine: models built with `import keras`, compressed natively.

`compress` (the in-place math: masks, centroids, weight fake-quant, written with keras.ops),
`quantize` (which tensors quantization-aware training ranges, and the layers without a kernel
that carry a range), `models` (checks, the recursive walk, copies, compiling), `apply`
(selection, preflight, one phase, reading), `runtime` (fit, callbacks, state, files).
`Keras3Engine` is the `Engine` over them.

Every path of the deployment tree (sparsity-preserving clustering, PQAT, CQAT, PCQAT, QAT);
export through TF's converter from the trained graph.
"""

from keras_colopt.engines.keras3 import compress, quantize  # noqa: F401  (registers the layer classes)
from keras_colopt.engines.keras3.apply import (  # noqa: F401
    can_touch, expectations, is_qat, kernels, preflight, quantized_per_channel,
    quiet_expected_warnings, select_layers, strip, apply_phase, plain, settle, switch_optimizer,
    switch_phase, wrapper_kind)
from keras_colopt.engines.keras3.models import (  # noqa: F401
    ContinuedSchedule, check_model, clone_model, compile_config, compile_like,
    flatten_nested, is_model, nested_models, rebuild, snapshot, walk)
from keras_colopt.engines.keras3.runtime import (  # noqa: F401
    check_callbacks, check_distill, check_strategy, custom_object_scope, demo_model,
    distillation, fit_arguments, history, is_progbar, is_sequence, load_model,
    progbar_callback, restore_state, save_state, tensorboard_callback, to_tflite_bytes)

from keras_colopt.engines import _flavour  # noqa: E402
from keras_colopt.engines.base import Engine as _Engine  # noqa: E402


class Keras3Engine(_Engine):
    """Keras 3 Sequential/Functional models (TensorFlow backend), compressed in place.

    Every interface method calls this package's function of the same name, looked up when
    called (a test can replace one with `monkeypatch.setattr(package, name, ...)`).
    """

    name = "keras3"
    supports_checkpoints = True
    supports_quantize_configs = False
    supports_drop_in = True

    def accepts(self, model) -> bool:
        return is_model(model)


_flavour.delegate(Keras3Engine, __name__)
