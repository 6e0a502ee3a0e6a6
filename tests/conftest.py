import os

# Keep TensorFlow's C++ start-up chatter out of the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def float32_policy():
    """Restores the float32 policy after tests that set a mixed-precision one."""
    yield
    keras.mixed_precision.set_global_policy("float32")
