"""Gaussian diffusion, DiT protocol: a port of DiT's / improved-diffusion's `gaussian_diffusion.py` and
`respace.py` (eps-prediction, learned-range variance, loss = MSE + VLB, respacing by kept alpha_bar).

Every schedule quantity is computed in float64 NumPy on the host, like the original, and enters the
traced computation as a float32 constant gathered at the timestep (DiT: `arr[t].float()`).

Model calls: `model_fn(x, t, y, cond, cond_level) -> out` (see `msf_jax.diffusion`); `t` is the model's
timestep input: the ORIGINAL 0..T-1 index (`timestep_map[t]`, also on a respaced schedule), as float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------------------------------
# Schedules and respacing (host-side, float64)
# ---------------------------------------------------------------------------------------------------
def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """DiT `get_named_beta_schedule('linear', T)`: 1e-4 -> 0.02 scaled by 1000 / T, float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """DiT `respace.space_timesteps`: which original steps to keep (e.g. "250", "10,15,20", "ddim50")."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))  # Python round (banker's), as DiT
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


# ---------------------------------------------------------------------------------------------------
# Elementwise helpers (DiT diffusion_utils.py)
# ---------------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of x (data in [-1, 1], 256 bins) under a discretized Gaussian, in nats."""
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """DDPM with eps-prediction and (optionally learned-range) variance, on a possibly respaced schedule."""

    kind = "gaussian"

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True, timestep_map=None,
                 clip_denoised: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("GaussianDiffusion: betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.learn_sigma = bool(learn_sigma)
        self.clip_denoised = bool(clip_denoised)
        self.timestep_map = (np.arange(self.num_timesteps, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError("GaussianDiffusion: timestep_map must have one entry per timestep")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, clipped because it is 0 at the start of the chain.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.array([]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.log_betas = np.log(betas)
        # FIXED_LARGE variance (DiT's choice when learn_sigma=False): [posterior_variance[1], betas[1:]].
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])

    @classmethod
    def dit(cls, num_timesteps: int = 1000, learn_sigma: bool = True, clip_denoised: bool = False
            ) -> "GaussianDiffusion":
        """DiT's `create_diffusion(timestep_respacing="")`: linear schedule, MSE + VLB when learn_sigma."""
        return cls(linear_beta_schedule(num_timesteps), learn_sigma=learn_sigma,
                   clip_denoised=clip_denoised)

    def __repr__(self):
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
                f"respaced={not np.array_equal(self.timestep_map, np.arange(self.num_timesteps))})")

    # ---- respacing ---------------------------------------------------------------------------------
    def respace(self, num_steps) -> "GaussianDiffusion":
        """DiT `SpacedDiffusion`: keep `space_timesteps(T, num_steps)`, betas from the kept alpha_bar.

        `num_steps` is an int or DiT's string form ("250", "10,20,30", "ddim50"). The returned process
        maps its indices to this process's model timesteps (so respacing composes).
        """
        use = space_timesteps(self.num_timesteps, str(num_steps) if isinstance(num_steps, int) else num_steps)
        last_alpha_cumprod = 1.0
        new_betas, kept = [], []
        for i, alpha_cumprod in enumerate(self.alphas_cumprod):
            if i in use:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                kept.append(i)
        return GaussianDiffusion(np.array(new_betas), learn_sigma=self.learn_sigma,
                                 timestep_map=self.timestep_map[np.array(kept)],
                                 clip_denoised=self.clip_denoised)

    # ---- gathers -----------------------------------------------------------------------------------
    @staticmethod
    def _extract(arr: np.ndarray, t, ndim: int):
        """arr[t] as float32, shaped (N, 1, ..., 1) to broadcast against an ndim-array."""
        vals = jnp.asarray(np.asarray(arr, np.float32))[t]
        return vals.reshape(vals.shape + (1,) * (ndim - 1))

    def model_timesteps(self, t):
        """Model timestep input for indices t (N,): the original index timestep_map[t], float32."""
        return jnp.asarray(self.timestep_map.astype(np.float32))[t]

    def sample_timesteps(self, key, n: int):
        """Uniform t in [0, T): (n,) int32."""
        return jax.random.randint(key, (n,), 0, self.num_timesteps, dtype=jnp.int32)

    # ---- forward process -----------------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t.ndim)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    # ---- reverse process -----------------------------------------------------------------------------
    def p_mean_variance(self, model_out, x_t, t_index):
        """DiT `p_mean_variance` from a model output (N,H,W,C) or, with learned sigma, (N,H,W,2C).

        Returns dict(mean, variance, log_variance, pred_xstart); t_index indexes this schedule.
        """
        c = x_t.shape[-1]
        model_out = model_out.astype(jnp.float32)
        if self.learn_sigma:
            if model_out.shape[-1] != 2 * c:
                raise ValueError(f"learn_sigma: model output needs {2 * c} channels, got {model_out.shape}")
            eps, var_values = model_out[..., :c], model_out[..., c:]
            min_log = self._extract(self.posterior_log_variance_clipped, t_index, x_t.ndim)
            max_log = self._extract(self.log_betas, t_index, x_t.ndim)
            frac = (var_values + 1) / 2  # the model's v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            eps = model_out[..., :c]
            variance = self._extract(self.fixed_large_variance, t_index, x_t.ndim) * jnp.ones_like(x_t)
            log_variance = (self._extract(np.log(self.fixed_large_variance), t_index, x_t.ndim)
                            * jnp.ones_like(x_t))
        pred_xstart = self.predict_xstart_from_eps(x_t, t_index, eps)
        if self.clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t_index)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

    def vb_terms_bpd(self, model_out, x_start, x_t, t):
        """Per-example VLB term in bits/dim: KL(q || p) for t > 0, decoder NLL at t == 0 (N,)."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return jnp.where(t == 0, decoder_nll, kl)

    # ---- training --------------------------------------------------------------------------------------
    def training_losses(self, model_fn, x0, t, noise, y, cond=None, cond_level=None):
        """DiT loss: MSE(eps) (+ VLB on a stop-gradient eps with learned sigma). dict(loss, mse, vb), (N,).

        `t` indexes this schedule; the model sees `model_timesteps(t)`.
        """
        x0 = x0.astype(jnp.float32)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, self.model_timesteps(t), y, cond, cond_level).astype(jnp.float32)
        c = x0.shape[-1]
        eps = out[..., :c]
        mse = mean_flat(jnp.square(noise - eps))
        if self.learn_sigma:
            # Learn the variance with the VLB only: the mean output is frozen for that term.
            frozen_out = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., c:]], axis=-1)
            vb = self.vb_terms_bpd(frozen_out, x0, x_t, t)
        else:
            vb = jnp.zeros_like(mse)
        return dict(loss=mse + vb, mse=mse, vb=vb)
