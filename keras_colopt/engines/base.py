"""The engine interface: how a phase is applied to a model of one Keras flavour.

Everything above `engines/` (fit, callbacks, checkpoint, export, tree, report, cli)
speaks to a model only through an `Engine`; only `engines/` imports tf_keras, tfmot or
keras. `get_engine(model)` asks each registered engine whether it `accepts` the model.

The lifecycle of one `collaborative_fit` call, in the engine's terms:

    check_model -> clone_model -> flatten_nested -> fold_plan/fold_activations
    -> preflight (every phase checked before training)
    -> per phase: apply_phase (wrap) -> compile_like -> fit -> kernels/expectations
       (read by the callbacks every epoch) -> save_state/restore_state (checkpoints)
    -> strip -> to_tflite_bytes

An engine is an object with these methods. Capability flags say what it can do, so that
callers ask instead of switching on Keras flavours:

    name                  a short label ("tfmot", "keras3")
    supports_checkpoints  per-epoch checkpoints and resume
    supports_quantize_configs  `Quantize(quantize_configs=...)` for custom layers
    supports_drop_in      phases switched in place inside one plain `model.fit`
                          (`callbacks.CollaborativeOptimization`, `switch_phase`)

A new engine is a subclass that implements the `REQUIRED` methods (the others have a
default here, for an engine that needs nothing there: no activations to fold, no nested
models to inline, no switch inside one `fit`), registered with
`keras_colopt.engines.register(MyEngine())`, and that passes the conformance suite
(`tests/test_contract.py`, parametrized over the registered engines).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

# (weight name, array, channel axis): a kernel as a layer computes with it.
Kernel = Tuple[str, object, Optional[int]]


class Engine:
    """Base class of every engine. Each method documents the contract; a method without a
    default raises `NotImplementedError` (`REQUIRED`), so that a missing one is found by the
    interface test; the others (`DEFAULTS`) do what an engine that needs nothing there
    does."""

    name = "base"
    supports_checkpoints = False
    supports_quantize_configs = False
    supports_drop_in = False

    # ------------------------------------------------------------------ models
    def accepts(self, model) -> bool:
        """Whether this engine handles `model` (its Keras flavour), without raising."""
        raise NotImplementedError

    def check_model(self, model, compiled: bool = True) -> None:
        """Raises a clear error unless `model` is a model this engine can train through the
        phases (built, a supported kind, compiled when `compiled`)."""
        raise NotImplementedError

    def clone_model(self, model):
        """A deep copy of `model` (new layers, same weights) that shares nothing with it."""
        raise NotImplementedError

    def walk(self, model) -> List[Tuple[str, object]]:
        """`[(path name, layer)]` of every layer, inside nested models too, at any depth;
        a nested layer's name is its path (`backbone/conv_pw_1`)."""
        raise NotImplementedError

    def nested_models(self, model) -> List[str]:
        """The path names of the models nested in `model` (empty when none)."""
        raise NotImplementedError

    def flatten_nested(self, model):
        """`model` with its nested models inlined into one equivalent model (same function,
        same weights), or `model` itself when it has none."""
        raise NotImplementedError

    def check_strategy(self, model, strategy) -> None:
        """Raises a clear error, before training, unless every phase of `model` can train
        under `strategy` (a `tf.distribute.Strategy`, checked as one by the caller)."""
        raise NotImplementedError

    def check_distill(self, model) -> None:
        """Raises a clear error, before training, unless `distillation` can make `model`
        train here."""
        raise NotImplementedError

    def distillation(self, model, teacher, settings) -> list:
        """Makes the compiled `model` train with the soft-target loss of `teacher`
        (`keras_colopt.distill`, `settings` a `Distill`): its train step minimizes
        `(1 - weight) * loss + weight * distill_loss` (only `distill_loss` on batches without
        labels, logits or probabilities as the compiled loss reads them) and logs both.
        Returns the callbacks the phase's fit needs for it. Called after `compile_like`."""
        raise NotImplementedError

    def compile_config(self, model) -> dict:
        """What `model.compile` was given, in a form `compile_like` can reuse."""
        raise NotImplementedError

    def compile_like(self, model, cfg: dict, learning_rate=None, step_offset: int = 0) -> None:
        """Compiles `model` as the original was, with a fresh optimizer at `learning_rate`
        (a number, a `phases.CosineDecay` over the phase's steps, or `None`: as compiled); a
        compiled schedule is read from `step_offset` on (the run's global step at the
        phase's start)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ planning
    def base_name(self, layer) -> str:
        """The user's name of a (possibly wrapped) layer. Default: its name (an engine
        without wrapper layers)."""
        return layer.name

    def can_touch(self, layer, kind: str) -> bool:
        """Whether a phase of `kind` ("prune", "cluster", "quantize") can apply to `layer`."""
        raise NotImplementedError

    def select_layers(self, model, phase, kind: str) -> Tuple[List[str], List[str]]:
        """(touched, skipped) layer names for a phase; raises for a bad `layers=`."""
        raise NotImplementedError

    def fold_plan(self, model):
        """(foldable, unfoldable) standalone activations after weighted layers, that this
        engine's preserving QAT would lose unless folded. Default: none to fold."""
        return {}, {}

    def fold_activations(self, model, pairs):
        """A copy of `model` with the `fold_plan` pairs folded (same function). Default:
        `model` (nothing to fold)."""
        return model

    def preflight(self, model, plan) -> Dict[str, List[str]]:
        """Checks every phase of `plan` against `model` before training; returns
        `{phase label: [layers it cannot touch]}`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ phases
    def apply_phase(self, model, planned, steps_per_epoch: int, hold: Sequence[str] = ()):
        """Wraps `model` for one planned phase; the `hold` layers (earlier work this phase
        does not touch) are frozen. Returns `(model, companion callbacks, touched)`."""
        raise NotImplementedError

    def switch_phase(self, model, planned, steps_per_epoch: int, hold, cfg: dict,
                     learning_rate=None, step_offset: int = 0):
        """Switches `model` to `planned` in place at the beginning of an epoch of a running
        `fit()` (a fresh optimizer like `cfg`'s, the step functions traced again); returns
        the layers it touches. Engines with `supports_drop_in` only: the default says so."""
        raise TypeError(
            f"The {self.name} engine cannot switch phases inside one model.fit (model "
            f"'{model.name}'). Use colopt.collaborative_fit(model, x, y, phases=[...]), which "
            "runs one fit() per phase on one epoch axis.")

    def switch_optimizer(self, model, cfg: dict, learning_rate=None,
                         step_offset: int = 0) -> None:
        """Gives `model` a fresh optimizer like `cfg`'s at `learning_rate` inside a running
        `fit()` (the rate probe of a drop-in phase). Engines with `supports_drop_in` only."""
        raise TypeError(f"The {self.name} engine cannot switch optimizers inside one "
                        f"model.fit (model '{model.name}'): see `switch_phase`.")

    def strip(self, model):
        """`model` without its pruning/clustering wrappers (QAT stays for the converter)."""
        raise NotImplementedError

    def plain(self, model):
        """`model` as the user built it (the engine's layer classes and variables gone) with
        its compressed kernels baked in; `keras_colopt.strip`."""
        raise NotImplementedError

    def settle(self, model) -> None:
        """At the end of a run: every compressed layer's own kernel variable holds the pruned
        and clustered values the layer computes with (so `get_weights()` shows them), in
        place, without changing what the model computes."""
        raise NotImplementedError

    def is_qat(self, model) -> bool:
        raise NotImplementedError

    def unpreserved_clusters(self, model, names) -> Dict[str, str]:
        """{layer: why} for clustered layers a CQAT/PCQAT model would train without clusters.
        Default: none (an engine whose QAT keeps every clustered kernel's clusters)."""
        return {}

    def quiet_expected_warnings(self, model):
        """A context manager hiding warnings that are expected by design while training."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reading
    def kernels(self, layer) -> List[Kernel]:
        """The kernels `layer` really computes with (masked, re-clustered, fake-quantized)."""
        raise NotImplementedError

    def expectations(self, model) -> Dict[str, dict]:
        """What the model's wrappers promise per layer: sparsity, clusters, per_channel."""
        raise NotImplementedError

    def wrapper_kind(self, model) -> str:
        """"prune", "cluster", "QAT", "PQAT", "CQAT", "PCQAT" or "none"."""
        raise NotImplementedError

    def quantized_per_channel(self, layer) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def snapshot(self, model):
        """An opaque copy of an unwrapped model as it is now, for `rebuild`."""
        raise NotImplementedError

    def rebuild(self, snap):
        """A new model from a `snapshot`."""
        raise NotImplementedError

    def save_state(self, model, path: str) -> None:
        """Writes the model's variables (wrappers included) and its optimizer's to `path`."""
        raise NotImplementedError

    def restore_state(self, model, path: str) -> None:
        """Reads a `save_state` back into a model built for the same phase."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training services
    def check_callbacks(self, callbacks) -> list:
        """The user's callbacks as a list, or a clear error for objects this engine's
        `fit` cannot drive."""
        raise NotImplementedError

    def fit_arguments(self) -> set:
        """The keyword arguments of this engine's `Model.fit`."""
        raise NotImplementedError

    def is_sequence(self, x) -> bool:
        """Whether `x` is a batched sequence of this flavour (its `len` is the steps)."""
        raise NotImplementedError

    def custom_object_scope(self, custom_objects):
        """A context manager making `custom_objects` known while layers are rebuilt."""
        raise NotImplementedError

    def history(self, model, epochs: List[int], history: Dict[str, list]):
        """A `History` callback object of this flavour holding `history`."""
        raise NotImplementedError

    def tensorboard_callback(self, log_dir: str):
        raise NotImplementedError

    def progbar_callback(self):
        raise NotImplementedError

    def is_progbar(self, callback) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ files
    def to_tflite_bytes(self, model, quantization: str, representative=None,
                        sparse: bool = False, qat: bool = False, io: str = "float32") -> bytes:
        """Converts a stripped model to `.tflite` bytes (`representative`: a generator
        function of calibration samples; `qat`: the model carries QAT ranges)."""
        raise NotImplementedError

    def load_model(self, path: str):
        """Loads a compiled model file of this flavour."""
        raise NotImplementedError

    def demo_model(self, seed: int = 0):
        """The demo's small compiled CNN for 8x8x1 digits."""
        raise NotImplementedError

    def is_model(self, obj) -> bool:
        """Whether `obj` is a model of this flavour."""
        raise NotImplementedError


class Callback:
    """An engine-neutral callback: the protocol tf_keras' and Keras 3's `fit` both drive.

    The library's own callbacks subclass it, so one class serves a tf_keras model and a
    Keras 3 one. Per-run state belongs in `on_train_begin` (one instance serves every
    phase's `fit()`). `self.model` is the model being trained; set `self.model.stop_training`
    to stop it.
    """

    # What tf_keras' CallbackList reads of a callback.
    _supports_tf_logs = False
    _chief_worker_only = None
    # What Keras 3's CallbackList reads.
    async_safe = False

    def __init__(self):
        self.model = None
        self.params = {}
        self.validation_data = None

    def set_params(self, params):
        self.params = params

    def set_model(self, model):
        self.model = model

    def _implements_train_batch_hooks(self):
        return False

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False

    def on_train_begin(self, logs=None): pass  # noqa: E704
    def on_train_end(self, logs=None): pass  # noqa: E704
    def on_epoch_begin(self, epoch, logs=None): pass  # noqa: E704
    def on_epoch_end(self, epoch, logs=None): pass  # noqa: E704
    def on_train_batch_begin(self, batch, logs=None): pass  # noqa: E704
    def on_train_batch_end(self, batch, logs=None): pass  # noqa: E704
    def on_test_begin(self, logs=None): pass  # noqa: E704
    def on_test_end(self, logs=None): pass  # noqa: E704
    def on_test_batch_begin(self, batch, logs=None): pass  # noqa: E704
    def on_test_batch_end(self, batch, logs=None): pass  # noqa: E704
    def on_predict_begin(self, logs=None): pass  # noqa: E704
    def on_predict_end(self, logs=None): pass  # noqa: E704
    def on_predict_batch_begin(self, batch, logs=None): pass  # noqa: E704
    def on_predict_batch_end(self, batch, logs=None): pass  # noqa: E704
    def on_batch_begin(self, batch, logs=None): pass  # noqa: E704
    def on_batch_end(self, batch, logs=None): pass  # noqa: E704

    # On a thread-safe backend (JAX, not TensorFlow) Keras 3's CallbackList dispatches the
    # batch-end hooks on a thread (no per-step sync of the logs) unless a callback overrides
    # one; it tells by this mark, which its own Callback's no-op hooks carry. A subclass
    # that overrides a hook loses the mark.
    for _hook in (on_batch_end, on_train_batch_end, on_test_batch_end, on_predict_batch_end):
        _hook._is_default = True
    del _hook


INTERFACE = sorted(n for n, v in vars(Engine).items() if callable(v) and not n.startswith("_"))
# The methods with a default in `Engine`: an engine overrides them only where it needs to.
DEFAULTS = ("base_name", "fold_activations", "fold_plan", "switch_optimizer", "switch_phase",
            "unpreserved_clusters")
REQUIRED = sorted(set(INTERFACE) - set(DEFAULTS))
