"""The PyTorch reference train step: diffusers' DiTTransformer2DModel with the same loss and optimizer.

Same model as msf_jax's DiT (built as tests/test_dit.py builds it), the same DiT loss (MSE on eps
plus the VLB on a stop-gradient eps with learned sigma, on the same float64-derived schedule cast to
float32), AdamW (lr 1e-4, no weight decay) and an EMA update, with the default (training-mode) label
dropout of diffusers (0.1). Only the random draws differ. Imported only when torch is installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from msf_jax.diffusion.gaussian import GaussianDiffusion


def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _approx_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _decoder_nll(x, means, log_scales):
    centered = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = _approx_cdf(inv * (centered + 1.0 / 255.0))
    cdf_min = _approx_cdf(inv * (centered - 1.0 / 255.0))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))


class TorchDiTStep:
    """One AdamW + EMA training step of a diffusers DiT with DiT's learned-sigma loss, NCHW."""

    def __init__(self, *, depth: int, hidden_size: int, num_heads: int, patch_size: int, input_size: int,
                 in_channels: int, num_classes: int, batch_size: int, seed: int = 0):
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(seed)
        self.model = DiTTransformer2DModel(
            num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
            out_channels=2 * in_channels, num_layers=depth, sample_size=input_size, patch_size=patch_size,
            num_embeds_ada_norm=num_classes, norm_eps=1e-6).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        g = GaussianDiffusion.dit(1000, learn_sigma=True)
        f32 = lambda a: torch.from_numpy(np.asarray(a, np.float32))
        self.sched = {k: f32(getattr(g, k)) for k in (
            "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
            "posterior_log_variance_clipped", "log_betas", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod")}
        self.c, self.n, self.size, self.num_classes = in_channels, batch_size, input_size, num_classes
        self.gen = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(batch_size, in_channels, input_size, input_size, generator=self.gen)
        self.y = torch.randint(0, num_classes, (batch_size,), generator=self.gen)

    def _ex(self, name, t):
        return self.sched[name][t].view(-1, 1, 1, 1)

    def loss(self, x0, y):
        n, c = x0.shape[0], self.c
        t = torch.randint(0, 1000, (n,), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        x_t = self._ex("sqrt_alphas_cumprod", t) * x0 + self._ex("sqrt_one_minus_alphas_cumprod", t) * noise
        out = self.model(x_t, t, y).sample
        eps, var_values = out[:, :c], out[:, c:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        eps_frozen = eps.detach()
        min_log = self._ex("posterior_log_variance_clipped", t)
        max_log = self._ex("log_betas", t)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._ex("sqrt_recip_alphas_cumprod", t) * x_t - self._ex("sqrt_recipm1_alphas_cumprod", t) * eps_frozen
        mean = self._ex("posterior_mean_coef1", t) * pred_x0 + self._ex("posterior_mean_coef2", t) * x_t
        true_mean = self._ex("posterior_mean_coef1", t) * x0 + self._ex("posterior_mean_coef2", t) * x_t
        kl = _normal_kl(true_mean, min_log, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = _decoder_nll(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.x0, self.y)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_mul_(self.ema, 0.9999)
            torch._foreach_add_(self.ema, self.params, alpha=1.0 - 0.9999)
        return float(loss.detach())
