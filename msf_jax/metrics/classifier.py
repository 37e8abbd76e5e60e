"""A small image classifier trained on the real training images: FID without downloaded weights.

Where no converted Inception weights exist (a CPU machine, a new data set), quality is scored on the
features of a CNN trained here on the same real images the generators learn from:
  - FID on its pooled features (`features`, 128-d by default) between samples and real images;
  - accuracy: how often it assigns a sample the class the sample was generated for (`predict`).
Both are noise-free functions of the images once the classifier is fixed (its own training is seeded),
so differences between generators are differences in the images. Not comparable with Inception FID.

Architecture: 3 stages of two 3x3 convs (GroupNorm, SiLU), 2x2 average pooling between stages,
global average pooling, a linear head; trained with AdamW, random flips and 2-pixel shifts.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from msf_jax.runtime import paths


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 128)
    epochs: int = 12
    # At most this many optimizer steps (0: no cap): on a large folder the epochs, not the folder, set
    # the cost (12 epochs of 49,000 images would be 4,590 steps), so a cap bounds it.
    max_steps: int = 0
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0


class ConvClassifier(nnx.Module):
    """uint8-range images (N, H, W, 3) -> logits (N, num_classes); `features` is the pooled layer."""

    def __init__(self, num_classes: int, widths=(32, 64, 128), *, rngs: nnx.Rngs):
        convs, norms = [], []
        c_in = 3
        for w in widths:
            for _ in range(2):
                convs.append(nnx.Conv(c_in, w, (3, 3), padding="SAME", rngs=rngs))
                norms.append(nnx.GroupNorm(w, num_groups=min(8, w), rngs=rngs))
                c_in = w
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.num_stages = len(widths)
        self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / 127.5 - 1.0  # (N, H, W, 3) in [-1, 1]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = nnx.silu(norm(conv(x)))
            if i % 2 == 1 and i // 2 < self.num_stages - 1:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))  # H/2, W/2 after each stage but the last
        return x.mean(axis=(1, 2))  # (N, widths[-1])

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))


def _augment(key, images: jax.Array) -> jax.Array:
    """Random horizontal flips and shifts of up to 2 pixels (edge padding), per image."""
    n, h, w, _ = images.shape
    k_flip, k_shift = jax.random.split(key)
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(flip, images[:, :, ::-1], images)
    padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    shifts = jax.random.randint(k_shift, (n, 2), 0, 5)
    return jax.vmap(lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), (h, w, img.shape[-1])))(padded, shifts)


def training_steps(num_images: int, cfg: ClassifierConfig) -> tuple[int, int]:
    """(steps per epoch, steps trained): cfg.epochs epochs of num_images, at most cfg.max_steps when set."""
    steps_per_epoch = max(1, num_images // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, (min(total, cfg.max_steps) if cfg.max_steps > 0 else total)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig = ClassifierConfig(),
                     log: Callable[[str], None] = print) -> ConvClassifier:
    """A ConvClassifier trained on uint8 (N, H, W, 3) images and int labels (seeded, deterministic)."""
    model = ConvClassifier(num_classes, cfg.widths, rngs=nnx.Rngs(cfg.seed))
    steps_per_epoch, total = training_steps(len(images), cfg)
    epochs = -(-total // steps_per_epoch)  # the last one may be partial
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(100, total // 10), total)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=cfg.weight_decay), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y, key):
        def loss_fn(m):
            logits = m(_augment(key, x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    done = 0
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        losses = []
        for i in range(min(steps_per_epoch, total - done)):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            key, sub = jax.random.split(key)
            losses.append(step(model, optimizer, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), sub))
        done += len(losses)
        log(f"classifier epoch {epoch + 1}/{epochs} (step {done}/{total}): "
            f"loss {float(np.mean(jax.device_get(losses))):.3f}")
    return model


def apply_batched(model: ConvClassifier, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float32, logits (N, classes) float32) of uint8 images, in batches."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        f = m.features(x)
        return f, m.head(f)

    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, l = run(state, jnp.asarray(images[i:i + batch_size]))
        feats.append(np.asarray(f, np.float32))
        logits.append(np.asarray(l, np.float32))
    return np.concatenate(feats), np.concatenate(logits)


def save_classifier(model: ConvClassifier, path: str, meta: dict) -> None:
    """Weights as a plain npz (no pickle) plus the constructor arguments in `meta`."""
    _, state = nnx.split(model)
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(state)}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **flat)
    paths.write_committed_bytes(path, buf.getvalue())


def load_classifier(path: str) -> tuple[ConvClassifier, dict]:
    with paths.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
    meta = json.loads(bytes(data["__meta__"]).decode())
    model = ConvClassifier(meta["num_classes"], tuple(meta["widths"]), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    restored = []
    for k, v in flat:
        name = "/".join(map(str, k))
        if name not in data or data[name].shape != np.shape(v):
            raise ValueError(f"{path}: classifier weights do not match the architecture at {name!r}")
        restored.append((k, jnp.asarray(data[name])))
    nnx.update(model, nnx.from_flat_state(restored))
    return model, meta
