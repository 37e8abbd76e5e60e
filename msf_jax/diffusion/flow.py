"""Flow matching (rectified flow) on the linear path x_t = (1 - t) x0 + t eps, velocity target eps - x0.

t = 1 is pure noise, t = 0 data; samplers integrate dx/dt = v from t = 1 to 0. The model sees
`t * time_scale` (1000 by default, the DiT timestep range) as float32. With a learned-sigma DiT
(2C output channels) the extra C channels are ignored: the loss uses the first C only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msf_jax.diffusion.gaussian import mean_flat

T_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching:
    """Conditional flow matching with a linear interpolation path and uniform / logit-normal t."""

    kind = "flow"

    def __init__(self, *, learn_sigma: bool = False, t_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, time_scale: float = 1000.0):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"FlowMatching: t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        self.learn_sigma = bool(learn_sigma)
        self.t_sampling = t_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.time_scale = float(time_scale)

    def __repr__(self):
        return f"FlowMatching(t_sampling={self.t_sampling!r}, learn_sigma={self.learn_sigma})"

    def model_timesteps(self, t):
        """Model timestep input for continuous t in [0, 1]: t * time_scale, float32."""
        return jnp.asarray(t, jnp.float32) * self.time_scale

    def sample_timesteps(self, key, n: int):
        """(n,) float32 t in [0, 1): uniform, or sigmoid(N(logit_mean, logit_std^2)) (SD3)."""
        if self.t_sampling == "uniform":
            return jax.random.uniform(key, (n,), jnp.float32)
        return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (n,), jnp.float32))

    def q_sample(self, x0, t, noise):
        t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
        return (1.0 - t) * x0 + t * noise

    def velocity_target(self, x0, noise):
        return noise - x0

    def training_losses(self, model_fn, x0, t, noise, y, cond=None, cond_level=None):
        """MSE between the predicted velocity (first C output channels) and eps - x0. dict(loss, mse, vb)."""
        x0 = x0.astype(jnp.float32)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, self.model_timesteps(t), y, cond, cond_level).astype(jnp.float32)
        v = out[..., :x0.shape[-1]]
        mse = mean_flat(jnp.square(self.velocity_target(x0, noise) - v))
        return dict(loss=mse, mse=mse, vb=jnp.zeros_like(mse))
