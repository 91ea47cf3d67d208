"""QAT of a model with a custom layer (tfmot guide "quantize custom Keras layer": write a
QuantizeConfig, quantize_annotate_layer(layer, quantize_config=...), quantize_scope(...),
quantize_apply), here Prune -> PQAT with the config given to the Quantize phase.

tfmot's 8-bit scheme knows only its own layer types: without `quantize_configs` this model is
refused before any training, naming `scaled_logits` and the argument to use.
"""
import tf_keras as keras
import tensorflow_model_optimization as tfmot

import keras_colopt as colopt
from _common import report, x, xt, y, yt

quantizers = tfmot.quantization.keras.quantizers


class ScaledDense(keras.layers.Dense):
    """Dense whose outputs are multiplied by a trained per-unit scale: not a tfmot layer."""

    def build(self, input_shape):
        super().build(input_shape)
        self.scale = self.add_weight("scale", shape=(self.units,), initializer="ones")

    def call(self, inputs):
        return super().call(inputs) * self.scale


class ScaledDenseQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """8-bit kernel (per tensor, symmetric), 8-bit activation and output (after the scale)."""

    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, quantizers.LastValueQuantizer(
            num_bits=8, symmetric=True, narrow_range=False, per_axis=False))]

    def get_activations_and_quantizers(self, layer):
        return [(layer.activation, quantizers.MovingAverageQuantizer(
            num_bits=8, symmetric=False, narrow_range=False, per_axis=False))]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return [quantizers.MovingAverageQuantizer(
            num_bits=8, symmetric=False, narrow_range=False, per_axis=False)]

    def get_config(self):
        return {}


keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.layers.Conv2D(16, 3, activation="relu", name="conv", input_shape=(8, 8, 1)),
    keras.layers.Flatten(name="flatten"),
    keras.layers.Dense(64, activation="relu", name="dense"),
    ScaledDense(10, name="scaled_logits"),
], name="custom_cnn")
model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

# The custom classes are found on the model and in the configs; anything else they name
# (a custom activation, a quantizer class) would go in collaborative_fit(custom_objects=...).
qat = colopt.Quantize(epochs=1, quantize_configs={"scaled_logits": ScaledDenseQuantizeConfig()})
result = colopt.collaborative_fit(
    model, x, y, phases=[colopt.Train(epochs=5), colopt.Prune(sparsity=0.5, epochs=2), qat],
    validation_data=(xt, yt), batch_size=32, verbose=0)
print("quantize wrappers:", [layer.name for layer in result.model.layers
                             if isinstance(layer, tfmot.quantization.keras.QuantizeWrapperV2)])
report("custom_layer_pqat", result.model)
