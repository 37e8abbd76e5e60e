"""Shape accuracy on the synthetic demo set: is a sample's blob the shape of its class?

The demo's classes differ in blob shape (disc / square / diamond / ring = class % 4) and also in
colour, position, background and texture, so an ordinary classifier can name the class of a sample
whose blob is a shapeless smudge. This one is trained on synthetic images whose shape is drawn
independently of their class (everything else as the class has it), so only the blob's outline tells
it the label. On samples of class c it is right when the blob has class c's shape: real images score
close to 1, shapeless blobs near chance (0.25). Weight-free and seeded; the spread is the bootstrap
standard deviation over the samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msf_jax.data.synthetic import BLOB_SHAPES, synthetic_images
from msf_jax.metrics import classifier as clf

SHAPE_NAMES = BLOB_SHAPES  # disc, square, diamond, ring
NUM_SHAPES = len(SHAPE_NAMES)


@dataclasses.dataclass(frozen=True)
class ShapeClassifierConfig:
    num_images: int = 4000  # shape-randomized training images
    widths: tuple[int, ...] = (16, 32, 64)
    epochs: int = 6
    # Far from the demo's training indices (0 ...) and its real-image draws, so the classifier never
    # sees an image the generator or the score uses.
    first_index: int = 1 << 40
    seed: int = 0


def train_shape_classifier(num_classes: int, image_size: int, data_seed: int = 0,
                           cfg: ShapeClassifierConfig = ShapeClassifierConfig(),
                           log=lambda msg: None) -> clf.ConvClassifier:
    """A ConvClassifier of the blob's shape (4 classes), trained on shape-randomized synthetic images."""
    indices = cfg.first_index + np.arange(cfg.num_images)
    shapes = np.random.default_rng(cfg.seed).integers(0, NUM_SHAPES, cfg.num_images)
    images, _ = synthetic_images(indices, num_classes=num_classes, image_size=image_size, seed=data_seed,
                                 shapes=shapes)
    return clf.train_classifier(images, shapes, NUM_SHAPES,
                                clf.ClassifierConfig(widths=cfg.widths, epochs=cfg.epochs, seed=cfg.seed), log=log)


def shape_accuracy(model: clf.ConvClassifier, images: np.ndarray, labels: np.ndarray, bootstrap: int = 200,
                   seed: int = 0) -> dict:
    """{'accuracy', 'std' (bootstrap over the images), 'per_shape': {name: accuracy}} of uint8 images
    (N, H, W, 3) generated for class `labels` (N,); the expected shape is label % 4."""
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"shape_accuracy: {len(images)} images for {len(labels)} labels")
    _, logits = clf.apply_batched(model, np.asarray(images))
    correct = (logits.argmax(-1) == labels % NUM_SHAPES).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(correct), (bootstrap, len(correct)))
    per_shape = {name: float(correct[labels % NUM_SHAPES == s].mean())
                 for s, name in enumerate(SHAPE_NAMES) if np.any(labels % NUM_SHAPES == s)}
    return {"accuracy": float(correct.mean()), "std": float(correct[draws].mean(axis=1).std()),
            "per_shape": per_shape}
