"""Keras 3 (`import keras`) and TensorFlow, imported once for the engine.

Importing Keras 3 changes nothing in the user's environment: `tf.keras` keeps naming what it
named (the tfmot engine's `_deps` resolves it first, under the user's environment).
"""

import tensorflow as tf

import keras
from keras import ops

__all__ = ["tf", "keras", "ops"]
