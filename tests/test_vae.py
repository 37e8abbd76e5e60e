"""SD VAE port: parity with diffusers' PyTorch AutoencoderKL, checkpoint layouts, errors, scaling, sharding."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msf_jax.convert.common import ConversionError
from msf_jax.convert.vae import convert_file, load_vae
from msf_jax.models import vae

import diffusers  # PyTorch references (the test extra)
import torch

SD_KW = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
             layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4)
# Three levels of different widths, so that the reversed decoder order and width changes are exercised.
# 32 groups (the default a bare .ckpt converts with: group counts are not in the weights).
TINY_KW = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 96),
               layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3)
TOL = 1e-4


def _torch_vae(kw, seed):
    """diffusers AutoencoderKL with random weights, GroupNorm affine parameters randomized too."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**kw).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                module.bias.copy_(0.3 * torch.randn_like(module.bias))
    return model


def _images(n, size, seed):
    """Smooth-ish random images in [-1, 1] (N, H, W, 3)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(-1, 1, (n, size // 4, size // 4, 3))
    x = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2) + 0.2 * rng.standard_normal((n, size, size, 3))
    return np.clip(x, -1, 1).astype(np.float32)


def _torch_reference(model, x_nhwc):
    """(mean, logvar, decoded(mean)) from PyTorch, as NHWC numpy."""
    with torch.no_grad():
        x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        dist = model.encode(x).latent_dist
        dec = model.decode(dist.mean).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return nhwc(dist.mean), nhwc(dist.logvar), nhwc(dec)


def _compare(ours, ref, what):
    mean, logvar = ours.encode_moments(jnp.asarray(ref["x"]))  # eager: cheaper than compiling here
    dec = ours.decode(jnp.asarray(ref["mean"]))
    errors = {}
    for name, got, want in (("mean", mean, ref["mean"]), ("logvar", logvar, ref["logvar"]),
                            ("decoded", dec, ref["dec"])):
        got = np.asarray(got)
        assert got.shape == want.shape, (what, name, got.shape, want.shape)
        errors[name] = float(np.max(np.abs(got - want)))
        print(f"{what} {name}: scale (std) {want.std():.3g}, max |x| {np.abs(want).max():.3g}, "
              f"max abs err {errors[name]:.2e}")
        assert 0.05 < want.std() < 50, f"{what} {name}: reference of degenerate scale {want.std()}"
    assert all(e < TOL for e in errors.values()), (what, errors)
    return errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Small random diffusers VAE, its state dict and reference outputs on 16x16 images."""
    model = _torch_vae(TINY_KW, seed=1)
    x = _images(2, 16, seed=2)
    mean, logvar, dec = _torch_reference(model, x)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(sd=sd, x=x, mean=mean, logvar=logvar, dec=dec, tmp=tmp_path_factory.mktemp("tiny"))


def test_parity_sd_width(tmp_path):
    """Full SD configuration, 64x64 input, converted from a saved diffusers folder: 1e-4 in float32."""
    model = _torch_vae(SD_KW, seed=0)
    x = _images(1, 64, seed=0)
    mean, logvar, dec = _torch_reference(model, x)
    folder = tmp_path / "sd-vae"
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "diffusion_pytorch_model.safetensors").exists()
    del model
    out = str(tmp_path / "vae.safetensors")
    summary = convert_file(str(folder), out)
    assert "83.65M params" in summary and "[128, 256, 512, 512]" in summary, summary
    ours = load_vae(out)
    assert ours.config == vae.SD_CONFIG
    assert vae.num_params(ours) == 83_653_863
    _compare(ours, dict(x=x, mean=mean, logvar=logvar, dec=dec), "SD-width")


def _ldm_state_dict(sd, levels):
    """diffusers VAE state dict -> original latent-diffusion naming (written independently of the converter)."""
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in [
            (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
            (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
            (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.", r"\1.mid.attn_1.q."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.", r"\1.mid.attn_1.k."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.", r"\1.mid.attn_1.v."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
            (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
            (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
            (r"\.conv_shortcut\.", ".nin_shortcut."),
        ]:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", key)
        if m:
            i = levels - 1 - int(m.group(1))  # LDM numbers decoder levels from the lowest resolution
            rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
            new = f"decoder.up.{i}.block.{rest}" if m.group(2) == "resnets" else f"decoder.up.{i}.upsample.{rest}"
        if ".mid.attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convs
        out[new] = value
    return out


@pytest.mark.parametrize("layout", ["ldm_full_sd", "ldm_bare", "diffusers_old_names_bin"])
def test_other_layouts(tiny, layout):
    """Original SD checkpoint (first_stage_model.* among other models' keys), bare LDM VAE, old diffusers names."""
    sd, levels = tiny["sd"], len(TINY_KW["block_out_channels"])
    path = str(tiny["tmp"] / f"{layout}.ckpt")
    if layout.startswith("ldm"):
        ldm = _ldm_state_dict(sd, levels)
        assert "decoder.up.0.block.2.conv2.weight" in ldm and "decoder.up.2.upsample.conv.weight" in ldm
        assert "encoder.mid.attn_1.q.weight" in ldm and "encoder.down.1.block.0.nin_shortcut.weight" in ldm
        if layout == "ldm_full_sd":
            state = {f"first_stage_model.{k}": v for k, v in ldm.items()}
            state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3, 3)
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(7)
            torch.save({"state_dict": state, "global_step": 1}, path)
        else:
            state = dict(ldm, **{"loss.logvar": torch.zeros(())})
            torch.save(state, path)
    else:
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        pattern = r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\."
        state = {re.sub(pattern, lambda m: f"attentions.0.{old[m.group(1)]}.", k): v for k, v in sd.items()}
        assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
        path = str(tiny["tmp"] / "diffusion_pytorch_model.bin")
        torch.save(state, path)
    out = str(tiny["tmp"] / f"{layout}.safetensors")
    summary = convert_file(path, out)
    assert ("ldm" in summary) == layout.startswith("ldm"), summary
    ours = load_vae(out)
    assert ours.config["block_out_channels"] == (32, 64, 96) and ours.config["norm_num_groups"] == 32
    _compare(ours, tiny, layout)


def test_conversion_errors_name_keys(tiny):
    from safetensors.torch import save_file

    sd = dict(tiny["sd"])
    del sd["decoder.up_blocks.1.resnets.2.conv1.bias"]
    sd["encoder.mid_block.attentions.0.to_extra.weight"] = torch.zeros(3)
    sd["encoder.down_blocks.0.resnets.1.norm2.weight"] = torch.zeros(17)
    folder = tiny["tmp"] / "broken"
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    with open(folder / "config.json", "w") as f:
        f.write('{"_class_name": "AutoencoderKL", "norm_num_groups": 32}')
    with pytest.raises(ConversionError) as err:
        convert_file(str(folder), str(tiny["tmp"] / "broken.safetensors"))
    msg = str(err.value)
    for key in ("decoder.up_blocks.1.resnets.2.conv1.bias", "encoder.mid_block.attentions.0.to_extra.weight",
                "encoder.down_blocks.0.resnets.1.norm2.weight"):
        assert key in msg, msg
    assert "missing 1" in msg and "unexpected 1" in msg and "1 misshaped" in msg, msg
    assert not os.path.exists(tiny["tmp"] / "broken.safetensors")


def _tiny_jax(dtype=jnp.float32, seed=0):
    return vae.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, dtype=dtype,
                             rngs=nnx.Rngs(seed))


def test_scaling_factor_applied_once():
    model = _tiny_jax()
    x = jnp.asarray(_images(2, 16, seed=3))
    mean, logvar = model.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 8, 8, 4)
    z = vae.sample_latents(mean, logvar, None)
    np.testing.assert_allclose(z, mean * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(vae.decode_latents(model, z), model.decode(mean), atol=1e-5)
    zs = vae.sample_latents(mean, logvar, jax.random.key(0))
    eps = jax.random.normal(jax.random.key(0), mean.shape)
    np.testing.assert_allclose(zs, 0.18215 * (mean + jnp.exp(0.5 * logvar) * eps), rtol=1e-5, atol=1e-6)
    # A non-default factor goes through the same two places.
    np.testing.assert_allclose(vae.decode_latents(model, vae.sample_latents(mean, logvar, None, 0.5), 0.5),
                               model.decode(mean), atol=1e-5)
    assert (vae.LOGVAR_MIN, vae.LOGVAR_MAX) == (-30.0, 20.0)
    u8 = vae.to_uint8(jnp.array([[[[-1.5, -1.0, 0.0]]], [[[0.999, 1.0, 2.0]]]]))
    assert u8.dtype == jnp.uint8 and u8.ravel().tolist() == [0, 0, 128, 255, 255, 255]


@pytest.mark.parametrize("bias, expected", [(100.0, 20.0), (-100.0, -30.0)])
def test_encode_moments_clips_logvar(bias, expected):
    model = _tiny_jax()
    lc = model.config["latent_channels"]
    b = model.quant_conv.bias
    b.value = b.value.at[lc:].set(bias)  # the logvar half of the moments
    x = jnp.asarray(_images(2, 16, seed=5))
    mean, logvar = model.encode_moments(x)
    assert logvar.shape == mean.shape == (2, 8, 8, lc)
    np.testing.assert_array_equal(np.asarray(logvar), np.full(logvar.shape, expected, np.float32))
    assert np.all(np.abs(np.asarray(mean)) < 50)  # the mean half is untouched


def test_bf16_close_to_fp32():
    fp32 = _tiny_jax()
    bf16 = _tiny_jax(jnp.bfloat16, seed=1)
    nnx.update(bf16, nnx.state(fp32, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x = jnp.asarray(_images(2, 16, seed=4))
    m32, _ = fp32.encode_moments(x)
    m16, _ = bf16.encode_moments(x)
    assert m16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(m16 - m32) / jnp.linalg.norm(m32))
    d32, d16 = fp32.decode(m32), bf16.decode(m32)
    rel_dec = float(jnp.linalg.norm(d16 - d32) / jnp.linalg.norm(d32))
    print(f"bf16 relative error: moments {rel:.2e}, decoded {rel_dec:.2e}")
    assert rel < 3e-2 and rel_dec < 3e-2


def test_sharded_encode_decode_match_unsharded():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
    model = _tiny_jax()
    x = jnp.asarray(_images(8, 16, seed=5))
    mean, logvar = vae.make_encode_fn(model)(x)
    smean, slogvar = vae.make_encode_fn(model, mesh)(x)
    assert len(smean.sharding.device_set) == 8 and smean.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(smean, mean, atol=1e-5)
    np.testing.assert_allclose(slogvar, logvar, atol=1e-5)
    z = vae.sample_latents(mean, logvar, None)
    img = vae.make_decode_fn(model)(z)
    simg = vae.make_decode_fn(model, mesh)(z)
    assert simg.shape == (8, 16, 16, 3) and len(simg.sharding.device_set) == 8
    np.testing.assert_allclose(simg, img, atol=1e-5)
    np.testing.assert_allclose(img, vae.decode_latents(model, z), atol=1e-5)
