"""Gradient checkpointing for the transformer layers of keras-hub backbones on TensorFlow.

Each transformer layer's forward pass runs under `tf.recompute_grad`: its
inner activations are not kept for the backward pass but computed again
from the layer's input, trading one more forward pass per layer for memory.
`keras.RematScope` does not do this for keras-hub's BERT under the
TensorFlow backend (Keras 3.15, keras-hub 0.32, tried on a 2-layer
backbone). "full" fails on a slicing step inside the backbone, and
"larger_than" fails eagerly on an attribute error. Under `tf.function`,
which `fit` uses, "list_of_layers" fails as well, because TensorFlow's
`custom_gradient` takes keyword arguments (the layer's masks) only
eagerly. "activations" works but recomputes only the activation
functions. tfft therefore wraps the layers itself.

Dropout is refused inside checkpointed layers. Keras dropout draws its mask
from a seed generator whose state advances on every call, so the
recomputation in the backward pass would draw a different mask than the
forward pass, and the gradients would belong to a network that never ran.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["enable_gradient_checkpointing"]


def _dropout_rates(layer) -> list[tuple[str, float]]:
    rates = []
    for sublayer in layer._flatten_layers(include_self=True):
        if isinstance(sublayer, keras.layers.Dropout) and sublayer.rate > 0:
            rates.append((sublayer.name, sublayer.rate))
        if isinstance(sublayer, keras.layers.MultiHeadAttention) and sublayer.dropout > 0:
            rates.append((f"{sublayer.name} attention", sublayer.dropout))
    return rates


def enable_gradient_checkpointing(backbone) -> int:
    """Recomputes each transformer layer of a keras-hub backbone in the backward pass.

    The layer's masks and `training` flag reach the recomputation unchanged.
    Works eagerly, under `tf.function` and under XLA.

    Args:
        backbone: A keras-hub backbone with a `transformer_layers` list (the
            BERT family, GPT-2, Llama and most other keras-hub transformers).

    Returns:
        The number of layers wrapped.

    Raises:
        ValueError: when the backbone has no `transformer_layers`, or when a
            transformer layer has dropout above 0.
    """
    layers = getattr(backbone, "transformer_layers", None)
    if not layers:
        raise ValueError(
            f"{type(backbone).__name__} has no `transformer_layers` to checkpoint. "
            "Gradient checkpointing supports keras-hub transformer backbones."
        )
    rates = [rate for layer in layers for rate in _dropout_rates(layer)]
    if rates:
        shown = ", ".join(f"{name} {rate:g}" for name, rate in rates[:4])
        raise ValueError(
            "Gradient checkpointing recomputes each transformer layer in the backward pass, "
            "and Keras dropout would draw a different mask the second time, so the "
            f"gradients would be wrong. Found dropout in the transformer layers: {shown}. "
            "Set the dropout to 0 (--dropout 0), or train without gradient checkpointing."
        )
    for layer in layers:
        if getattr(layer, "_tfft_checkpointed", False):
            continue
        original_call = layer.call

        def call(inputs, *args, _original_call=original_call, **kwargs):
            # Masks, `training` and other arguments are closed over, so they are
            # not differentiated and the recomputation gets the same values.
            def forward(layer_inputs):
                return _original_call(layer_inputs, *args, **kwargs)

            return tf.recompute_grad(forward)(inputs)

        # Keras calls `self.call`, so replacing it on this instance changes the
        # backbone's graph without rebuilding it.
        layer.call = call
        layer._tfft_checkpointed = True
    return len(layers)
