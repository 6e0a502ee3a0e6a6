import os
from pathlib import Path

# Keep TensorFlow's C++ start-up messages out of the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real GLUE data, kept beside the repository on development and CI machines only.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a an good bad great awful movie food service room was is it very not and "
    "but i we they loved hated slow fast friendly rude fresh stale cheap broken"
).split()


@pytest.fixture(autouse=True)
def float32_policy():
    """Restores the float32 policy after tests that set a mixed-precision one."""
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> Path:
    """A keras-hub BERT preset folder with 2 layers of width 8 and a 36-word vocabulary."""
    import keras_hub

    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=TINY_VOCABULARY, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=32)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(TINY_VOCABULARY),
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=64,
    )
    folder = tmp_path_factory.mktemp("tiny_bert")
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    folder = SHARED_DATA / "glue"
    if not folder.is_dir():
        pytest.skip(f"real GLUE data not found at {folder} (present on development machines only)")
    return folder
