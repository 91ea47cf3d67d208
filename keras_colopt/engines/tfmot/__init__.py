"""The tfmot engine: tf_keras (Keras 2) models through tensorflow-model-optimization.

Split by concern: `_deps` (the imports, leaving the user's environment as it was),
`models` (checks, copies, compiling), `layers` (selection and names), `wrap` (one phase's
wrappers), `quantize` (QAT schemes, centroids, dry run), `read` (what a wrapped layer
computes with), `fold` (standalone activations), `checks` (preflight: every phase checked
before training), `flatten` (nested models), `runtime` (fit, callbacks, state, files).
`TfmotEngine` is the `Engine` over them.
"""

from keras_colopt.engines.tfmot._deps import tf_keras, tfmot  # noqa: F401
from keras_colopt.engines.tfmot.fold import (  # noqa: F401
    fold_activations, fold_plan)
from keras_colopt.engines.tfmot.layers import (  # noqa: F401
    activation_after, base_layer, base_name, can_touch, select_layers)
from keras_colopt.engines.tfmot.models import (  # noqa: F401
    ContinuedSchedule, check_model, clone_model, compile_config, compile_like, rebuild,
    snapshot)
from keras_colopt.engines.tfmot.checks import check_precision, preflight  # noqa: F401
from keras_colopt.engines.tfmot.quantize import (  # noqa: F401
    custom_classes, dry_run_quantize, expected_gradient_warning,
    gradless_by_design, quiet_expected_warnings, unpreserved_clusters)
from keras_colopt.engines.tfmot.read import (  # noqa: F401
    expectations, is_qat, kernels, quantized_per_channel, wrapper_kind)
from keras_colopt.engines.tfmot.wrap import (  # noqa: F401
    apply_phase, keep_output_names, plain, pruning_schedule, settle, strip, switch_phase)
from keras_colopt.engines.tfmot.runtime import (  # noqa: F401,E402
    check_callbacks, check_distill, check_strategy, custom_object_scope, demo_model,
    distillation, fit_arguments, history, is_model, is_progbar, is_sequence, load_model,
    progbar_callback, restore_state, save_state, tensorboard_callback, to_tflite_bytes)
from keras_colopt.engines.tfmot.flatten import (  # noqa: F401,E402
    flatten_nested, nested_models, restore_training_args, walk)

from keras_colopt.engines import _flavour  # noqa: E402
from keras_colopt.engines.base import Engine as _Engine  # noqa: E402


class TfmotEngine(_Engine):
    """tf_keras Sequential/Functional models, through tensorflow-model-optimization.

    Every interface method calls this package's function of the same name, looked up when
    called (so that a test can replace one with `monkeypatch.setattr(package, name, ...)`).
    """

    name = "tfmot"
    supports_checkpoints = True
    supports_quantize_configs = True

    def accepts(self, model) -> bool:
        return is_model(model)


_flavour.delegate(TfmotEngine, __name__)
