"""FID Inception v3 (the 2015-12-05 TensorFlow graph, as ported by pytorch-fid), in Flax NNX, NHWC.

The network is pytorch-fid's `InceptionV3(use_fid_inception=True)`: torchvision's Inception3 layout with
the `FIDInceptionA/C/E_1/E_2` blocks (average pools that ignore padding, a max pool in the last block's
pool branch). Input handling follows pytorch-fid exactly: images in [0, 1] are resized to 299×299 with
bilinear interpolation (half-pixel centers, i.e. `align_corners=False`, no antialiasing), then scaled to
[-1, 1]. (ADM's TensorFlow evaluator resizes inside the graph with TF1 `ResizeBilinear` and scales by
(x - 128) / 128 instead. How far that moves FID is not measured: docs/imagenet.md, FID comparability.)

Outputs, per image:
- `pool`: 2048-d global average pool after Mixed_7c (FID, precision/recall) = TF `pool_3:0`;
- `logits`: 1008-way logits for the Inception Score, when the weights include `fc`. ADM's evaluator
  uses only the MatMul of the graph's `softmax/logits` layer (no bias): `logits_bias=False` (default)
  does the same; `logits_bias=True` adds the bias (= torchvision's `fc`);
- `spatial`: sFID features = ADM's `mixed_6/conv:0[..., :7]` flattened (17·17·7 = 2023). In the TF graph
  the mixed blocks are named mixed, mixed_1, ..., mixed_10 in order, i.e. Mixed_5b, 5c, 5d, 6a, 6b, 6c,
  **6d**, 6e, 7a, 7b, 7c, so `mixed_6` is Mixed_6d, and its `conv` node (the ReLU after the first conv
  + batchnorm, the block's 1×1 branch) is `Mixed_6d.branch1x1`. Its first 7 channels are flattened in
  (h, w, c) order, as TF flattens its NHWC tensor, so statistics are comparable with ADM's `mu_s`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msf_jax.runtime import axes
from msf_jax.runtime.sharding import BatchedFn

INPUT_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (1000 classes + 8 unused)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


def _meta(*names):
    # Logical axes only (replicated by the default rules); no eager sharding, so no mesh is needed.
    return {"out_sharding": tuple(names), "eager_sharding": False}


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(N,H,W,C) -> (N,size,size,C), = F.interpolate(mode='bilinear', align_corners=False), no antialias."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images  # F.interpolate to the same size is the identity too
    return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


def _avg_pool_3x3_same(x):
    """3×3 stride-1 average pool, padding 1, padded zeros not counted (count_include_pad=False)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


def _max_pool(x, stride: int, pad: int):
    """3×3 max pool (padding with -inf, as PyTorch)."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


class BasicConv2d(nnx.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=(0, 0), *, rngs: nnx.Rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=[(p, p) for p in padding],
                             use_bias=False, rngs=rngs,
                             kernel_metadata=_meta(None, None, axes.CONV_IN, axes.CONV_OUT))
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs,
                                scale_metadata=_meta(axes.NORM), bias_metadata=_meta(axes.NORM))

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d (FIDInceptionA: average pool without padded zeros)."""

    def __init__(self, cin: int, pool_features: int, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # (N,H,W,224+pool_features)


class InceptionB(nnx.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int, *, rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)  # (N,17,17,768)


class InceptionC(nnx.Module):
    """Mixed_6b..6e (FIDInceptionC: average pool without padded zeros)."""

    def __init__(self, cin: int, c7: int, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x, return_1x1: bool = False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        out = jnp.concatenate([b1, b7, bd, bp], axis=-1)  # (N,17,17,768)
        return (out, b1) if return_1x1 else out


class InceptionD(nnx.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int, *, rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)  # (N,8,8,1280)


class InceptionE(nnx.Module):
    """Mixed_7b (FIDInceptionE_1: average pool w/o padded zeros) and Mixed_7c (FIDInceptionE_2: max pool)."""

    def __init__(self, cin: int, pool: str, *, rngs):
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        # The FID graph max-pools in Mixed_7c where the paper (and torchvision) average-pool.
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool(x, 1, 1)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)  # (N,8,8,2048)


class FIDInception(nnx.Module):
    """pytorch-fid's FID Inception v3: images in [0,1] -> pool / logits / spatial features."""

    def __init__(self, *, with_logits: bool = True, logits_bias: bool = False, rngs: nnx.Rngs):
        self.with_logits = with_logits
        self.logits_bias = logits_bias
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        if with_logits:
            self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, rngs=rngs,
                                 kernel_metadata=_meta(axes.CONV_IN, axes.CLASSES),
                                 bias_metadata=_meta(axes.CLASSES))

    def __call__(self, images01) -> dict[str, jax.Array]:
        x = resize_bilinear(jnp.asarray(images01, jnp.float32))  # (N,299,299,3)
        x = 2.0 * x - 1.0
        x = self.Conv2d_1a_3x3(x)  # (N,149,149,32)
        x = self.Conv2d_2a_3x3(x)  # (N,147,147,32)
        x = self.Conv2d_2b_3x3(x)  # (N,147,147,64)
        x = _max_pool(x, 2, 0)  # (N,73,73,64)
        x = self.Conv2d_3b_1x1(x)  # (N,73,73,80)
        x = self.Conv2d_4a_3x3(x)  # (N,71,71,192)
        x = _max_pool(x, 2, 0)  # (N,35,35,192)
        x = self.Mixed_5b(x)  # (N,35,35,256)
        x = self.Mixed_5c(x)  # (N,35,35,288)
        x = self.Mixed_5d(x)  # (N,35,35,288)
        x = self.Mixed_6a(x)  # (N,17,17,768)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x, return_1x1=True)  # TF mixed_6/conv: (N,17,17,192)
        x = self.Mixed_6e(x)
        x = self.Mixed_7a(x)  # (N,8,8,1280)
        x = self.Mixed_7b(x)  # (N,8,8,2048)
        x = self.Mixed_7c(x)  # (N,8,8,2048)
        pool = jnp.mean(x, axis=(1, 2))  # (N,2048)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]
        out = {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1)}  # (N,2023), (h,w,c) order
        if self.with_logits:
            logits = pool @ self.fc.kernel[...]  # (N,1008)
            out["logits"] = logits + self.fc.bias[...] if self.logits_bias else logits
        return out


def make_feature_fn(model: FIDInception, mesh=None):
    """Returns fn(images) -> {'pool', 'spatial'[, 'logits']} as jax arrays, replicated (every host can
    read them).

    `images`: (N,H,W,3) uint8 in [0,255] or float in [0,1], any N: the batch is sharded over the mesh's
    batch axes, padded to a multiple of their size, and the padding dropped from the result
    (`sharding.BatchedFn`); mesh None = this host's devices.
    """
    graphdef, state = nnx.split(model)

    def forward(state, images):
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        return nnx.merge(graphdef, state)(images)

    return BatchedFn(forward, state, mesh, out="replicated")
