"""Quantize(quantize_configs=...) and collaborative_fit(custom_objects=...): custom layers and
Lambdas are quantized with the user's QuantizeConfig; without one they are refused before
training; the configs never reach a recipe file."""

import re

import numpy as np
import pytest
import tf_keras as keras
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_configs)

import keras_colopt as colopt
from keras_colopt import export, recipe

from conftest import Recorder

quantizers = tfmot.quantization.keras.quantizers


class ScaledDense(keras.layers.Dense):
    """Dense times a trained per-unit scale: a layer tfmot's 8-bit scheme does not know."""

    def build(self, input_shape):
        super().build(input_shape)
        self.scale = self.add_weight("scale", shape=(self.units,), initializer="ones")

    def call(self, inputs):
        return super().call(inputs) * self.scale


class KernelAndOutputConfig(tfmot.quantization.keras.QuantizeConfig):
    """8-bit kernel and 8-bit output; the activation (if any) runs in between, unquantized."""

    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, quantizers.LastValueQuantizer(
            num_bits=8, symmetric=True, narrow_range=False, per_axis=False))]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        layer.kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [quantizers.MovingAverageQuantizer(
            num_bits=8, symmetric=False, narrow_range=False, per_axis=False)]

    def get_config(self):
        return {}


class ScaledDenseConfig(KernelAndOutputConfig):
    """Also the activation in 8 bits (as tfmot's Dense): every op of the .tflite is int8."""

    def get_activations_and_quantizers(self, layer):
        return [(layer.activation, quantizers.MovingAverageQuantizer(
            num_bits=8, symmetric=False, narrow_range=False, per_axis=False))]

    def set_quantize_activations(self, layer, quantize_activations):
        layer.activation = quantize_activations[0]


def model_with(head, seed=0):
    """conv -> flat -> hidden -> `head` (a layer named 'custom') -> logits."""
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(i)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    o = keras.layers.Dense(10, name="logits")(head()(h))
    model = keras.Model(i, o, name="custom_model")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def scaled():
    return ScaledDense(16, activation="relu", name="custom")


def halving():
    return keras.layers.Lambda(lambda t: t * 0.5, name="custom")


def wrapper_of(model, name):
    (layer,) = [l for l in model.layers if getattr(l, "layer", l).name == name]
    return layer


def agreement(path, model, x):
    """Fraction of samples where the .tflite and the QAT Keras model predict the same class."""
    return float(np.mean(np.argmax(export.predict_tflite(path, x), -1)
                         == np.argmax(model.predict(x, verbose=0), -1)))


def test_custom_layer_is_quantized_to_int8_and_resumes(digits, tmp_path):
    (x, y), (xt, yt) = digits

    def call():
        return colopt.collaborative_fit(
            model_with(scaled), x, y, batch_size=64, verbose=0, validation_data=(xt, yt),
            checkpoint_dir=tmp_path / "ckpt",
            phases=[colopt.Prune(sparsity=0.5, epochs=1), colopt.Quantize(
                epochs=1, quantize_configs={"custom": ScaledDenseConfig()})])
    result = call()
    wrapper = wrapper_of(result.model, "custom")
    assert isinstance(wrapper, tfmot.quantization.keras.QuantizeWrapperV2)
    assert isinstance(wrapper.layer, ScaledDense)
    assert isinstance(wrapper.quantize_config, ScaledDenseConfig)
    assert result.skipped["Prune"] == ["custom"]   # tfmot cannot prune it: said, not hidden
    path = export.to_tflite(result.model, tmp_path / "custom.tflite").path
    weights = export.inspect_tflite(path)
    assert len(weights) == 4 and {w.dtype for w in weights} == {"int8"}
    ops = export.operators(path)
    assert "MUL" in ops                      # the custom layer's scale, in int8
    assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE"
    assert export.inner_float_tensors(path) == []  # every op between runs on int8
    assert agreement(path, result.model, xt) >= 0.9
    again = call()  # a checkpoint of a run with quantize_configs is found again and resumed
    assert again.resumed_at == 2
    for a, b in zip(again.model.get_weights(), result.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_lambda_with_an_output_only_config(digits, tmp_path):
    (x, y), (xt, _) = digits
    config = default_8bit_quantize_configs.Default8BitOutputQuantizeConfig()
    result = colopt.collaborative_fit(
        model_with(halving), x, y, batch_size=64, verbose=0,
        phases=[colopt.Quantize(epochs=1, quantize_configs={"custom": config})])
    assert isinstance(wrapper_of(result.model, "custom").layer, keras.layers.Lambda)
    path = export.to_tflite(result.model, tmp_path / "lambda.tflite").path
    assert {w.dtype for w in export.inspect_tflite(path)} == {"int8"}
    assert agreement(path, result.model, xt) >= 0.9


@pytest.mark.parametrize("head,kind", [(scaled, "ScaledDense"), (halving, "Lambda")])
def test_unsupported_layer_without_config_is_refused_before_training(digits, head, kind):
    (x, y), _ = digits
    recorder = Recorder()
    with pytest.raises(ValueError, match=re.escape(f"none for 'custom' ({kind})")) as info:
        colopt.collaborative_fit(model_with(head), x, y, batch_size=64, verbose=0,
                                 callbacks=[recorder],
                                 phases=[colopt.Train(epochs=1), colopt.Quantize(epochs=1)])
    assert "quantize_configs={'layer': MyQuantizeConfig()}" in str(info.value)
    assert recorder.train_begins == 0 and recorder.epochs == []


@pytest.mark.parametrize("quantize,words", [
    (dict(quantize_configs={"dense_9": KernelAndOutputConfig()}),
     ["names layer(s) ['dense_9']", "Expected names from: ['image', 'conv', 'flat', 'hidden', "
      "'custom', 'logits']"]),
    (dict(quantize_configs={"custom": KernelAndOutputConfig()}, layers=["hidden"]),
     ["['custom'] have a quantize config but this phase does not quantize them"]),
    (dict(quantize_configs={"image": KernelAndOutputConfig()}),
     ["['image'] have a quantize config", "an Input layer"]),
    (dict(quantize_configs={"custom": object()}),
     ["quantize_configs of ['custom'] are not QuantizeConfig objects ({'custom': 'object'})"]),
])
def test_bad_quantize_configs_are_refused_before_training(digits, quantize, words):
    (x, y), _ = digits
    recorder = Recorder()
    with pytest.raises(ValueError) as info:
        colopt.collaborative_fit(model_with(scaled), x, y, batch_size=64, verbose=0,
                                 callbacks=[recorder],
                                 phases=[colopt.Train(epochs=1), colopt.Quantize(epochs=1,
                                                                                 **quantize)])
    for w in words:
        assert w in str(info.value)
    assert recorder.epochs == []


def halved_relu(t):
    return keras.activations.relu(t) * 0.5


def test_custom_objects_reach_every_rebuild(digits):
    (x, y), _ = digits

    def dense():
        return keras.layers.Dense(16, activation=halved_relu, name="custom")
    quantize = colopt.Quantize(epochs=1, quantize_configs={"custom": KernelAndOutputConfig()})
    phases = [colopt.Prune(sparsity=0.5, epochs=1, layers=["conv", "hidden"]), quantize]
    with pytest.raises(ValueError, match=r"Cannot copy model 'custom_model'.*custom_objects="):
        colopt.collaborative_fit(model_with(dense), x, y, phases=phases, verbose=0)
    # A QuantizeConfig of a pruned layer would replace tfmot's pruning-preserving quantizer.
    with pytest.raises(ValueError, match=r"The QuantizeConfig given for \['custom'\] in "):
        colopt.collaborative_fit(model_with(dense), x, y, verbose=0,
                                 custom_objects={"halved_relu": halved_relu},
                                 phases=[colopt.Prune(sparsity=0.5, epochs=1), quantize])
    result = colopt.collaborative_fit(model_with(dense), x, y, phases=phases, batch_size=64,
                                      verbose=0, custom_objects={"halved_relu": halved_relu})
    assert wrapper_of(result.model, "custom").layer.activation is halved_relu
    with pytest.raises(ValueError, match=r"custom_objects.*Received: custom_objects=\['x'\]"):
        colopt.collaborative_fit(model_with(dense), x, y, phases=phases, verbose=0,
                                 custom_objects=["x"])


def test_recipe_refuses_quantize_configs_naming_them():
    phases = [colopt.Train(epochs=1),
              colopt.Quantize(epochs=1, quantize_configs={"custom": KernelAndOutputConfig()})]
    with pytest.raises(recipe.RecipeError) as info:
        recipe.dumps(phases)
    assert info.value.key == "phases[1].quantize.quantize_configs"
    assert "Received: quantize_configs={'custom': KernelAndOutputConfig}" in str(info.value)
    with pytest.raises(recipe.RecipeError, match="plain data, not a QuantizeConfig") as info:
        recipe.loads("phases:\n  - quantize: {epochs: 1, quantize_configs: {custom: Config}}\n")
    assert info.value.key == "phases[0].quantize.quantize_configs"


def test_quantize_configs_round_trip_and_validation():
    config = KernelAndOutputConfig()
    phase = colopt.Quantize(epochs=1, layers=["custom"], quantize_configs={"custom": config})
    cfg = phase.get_config()
    assert cfg["quantize_configs"] == {"custom": config}
    assert colopt.Quantize.from_config(cfg) == phase
    assert "quantize_configs={'custom': <KernelAndOutputConfig>}" in repr(phase)
    assert colopt.Quantize(epochs=1).get_config()["quantize_configs"] is None
    for bad, words in [({}, "non-empty mapping"), (["custom"], "non-empty mapping"),
                       ({"": config}, "must be a layer name"),
                       ({"custom": KernelAndOutputConfig}, "a class, not an instance"),
                       ({"custom": None}, "plain data"), ({"custom": {}}, "plain data")]:
        with pytest.raises(ValueError, match=re.escape(words)) as info:
            colopt.Quantize(epochs=1, quantize_configs=bad)
        assert "Expected" in str(info.value) and "Received: quantize_configs=" in str(info.value)
