"""Fine-tune a keras-hub classifier with tfft's training model inside plain `model.fit`.

Run from the repository root:  python examples/fit_with_keras.py
"""

import keras
import keras_hub
import tensorflow as tf

import tfft
from tfft.callbacks import TrainingTelemetry
from tfft.models import bundled_model_dir

texts = ["a warm, funny film", "the soup was cold and bland", "great service", "never again"]
labels = [1, 0, 1, 0]

classifier = keras_hub.models.TextClassifier.from_preset(str(bundled_model_dir()), num_classes=2)
classifier.preprocessor.sequence_length = 32
features = classifier.preprocessor(x=(tf.constant(texts),))
data = tf.data.Dataset.from_tensor_slices((features, labels)).shuffle(4, seed=0).batch(4)

# One fit step is one optimizer update over the global batch of 4, computed
# in two micro-batches of 2 and clipped once to a global norm of 1.
model = tfft.FineTuneModel(classifier, micro_batch_size=2, max_grad_norm=1.0)
schedule = tfft.WarmupSchedule(2e-5, total_updates=6, warmup_updates=2, decay="linear")
model.compile(
    optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
model.fit(
    data,
    epochs=6,
    shuffle=False,  # the dataset shuffles itself
    callbacks=[TrainingTelemetry("saved_models/example-fit/logs")],
    verbose=2,
)
