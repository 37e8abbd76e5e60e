"""DiT: parity with diffusers' DiTTransformer2DModel (random weights), checkpoint conversion, init, options."""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx

from msf_jax.convert import __main__ as convert_cli
from msf_jax.convert.common import ConversionError, flatten, load_into_model, unflatten
from msf_jax.convert.dit import convert_diffusers_dit, convert_official_dit, infer_config, load_dit
from msf_jax.models.dit import (CONFIG_FIELDS, DIT_CONFIGS, DiT, config_defaults, dit_flops_per_example,
                                dit_from_config)
from msf_jax.runtime import axes

# Two small diffusers configs: (layers, heads, head_dim, patch, sample_size, in_channels, classes).
PARITY_CONFIGS = [(2, 4, 16, 2, 8, 4, 10), (3, 2, 24, 4, 16, 3, 7)]
TOL = 1e-4


def _diffusers_dit(layers, heads, head_dim, patch, size, chans, classes, seed=0):
    """A random diffusers DiT with EVERY parameter randomized (adaLN/final layer too) and the per-block
    timestep/class embedders tied to block 0's (as in a converted official checkpoint)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=chans,
                                  out_channels=2 * chans, num_layers=layers, sample_size=size,
                                  patch_size=patch, num_embeds_ada_norm=classes,
                                  norm_eps=1e-6).eval()  # DiT's LayerNorm eps (diffusers default 1e-5)
    with torch.no_grad():
        for p in model.parameters():  # O(1) activations: fan-in scaled weights, small biases
            p.copy_(torch.randn_like(p) * (0.7 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1))
        emb0 = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0.state_dict())
    return model


def _torch_forward(model, x_nhwc, t, y):
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                    torch.from_numpy(t), torch.from_numpy(y)).sample
    return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _inputs(cfg, n=3, seed=1):
    layers, heads, head_dim, patch, size, chans, classes = cfg
    rng = np.random.RandomState(seed)
    x = rng.randn(n, size, size, chans).astype(np.float32)
    t = np.array([0, 421, 999][:n], dtype=np.int64)
    y = np.array([1, classes - 1, classes][:n], dtype=np.int64)  # the last one is the null class
    return x, t, y


def _max_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _randomize(model: DiT, seed: int = 0, scale: float = 0.3) -> DiT:
    """Sets every parameter (incl. the zero-initialized ones) to random values; works on abstract models."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.RandomState(seed)
    flat = {k: scale * rng.randn(*v.shape).astype(np.float32) / (v.shape[0] ** 0.5 if len(v.shape) > 1 else 3.0)
            for k, v in sorted(_shapes(state.to_pure_dict()).items())}
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v) for k, v in flat.items()}))
    nnx.update(model, state)
    return model


def _shapes(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_shapes(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


@nnx.jit
def _fwd(model, x, t, y, cond=None, level=None, key=None):
    return model(x, t, y, cond, level, label_drop_key=key)


def _tiny(abstract=False, **kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    make = lambda: DiT(**args, rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.eval_shape(make) if abstract else make()


# ------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", PARITY_CONFIGS)
def test_parity_with_diffusers(cfg):
    layers, heads, head_dim, patch, size, chans, classes = cfg
    ref_model = _diffusers_dit(*cfg)
    sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    config, _ = infer_config(sd, "diffusers", model=f"num_heads={heads}", input_size=size)
    assert (config["depth"], config["hidden_size"], config["patch_size"], config["num_classes"]) == (
        layers, heads * head_dim, patch, classes)
    # diffusers' timestep embedding divides the frequency exponent by half-1 (official DiT: half).
    config["timestep_freq_shift"] = 1
    ours = load_into_model(nnx.eval_shape(lambda: DiT(**config, rngs=nnx.Rngs(0))), convert_diffusers_dit(sd), "DiT")

    x, t, y = _inputs(cfg)
    ref = _torch_forward(ref_model, x, t, y)
    out = np.asarray(_fwd(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    assert out.shape == (3, size, size, 2 * chans) and out.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # not a comparison of zeros
    err_eps, err_var = _max_err(out[..., :chans], ref[..., :chans]), _max_err(out[..., chans:], ref[..., chans:])
    print(f"parity {cfg}: eps {err_eps:.2e}, variance {err_var:.2e}")
    assert err_eps < TOL and err_var < TOL

    # Guidance-style batch [cond; uncond]: same latents, labels then the null class (eval: no dropout).
    x2 = np.concatenate([x[:2], x[:2]])
    t2 = np.concatenate([t[:2], t[:2]])
    y2 = np.concatenate([y[:2], np.full(2, classes)])
    ref2 = _torch_forward(ref_model, x2, t2, y2)
    out2 = np.asarray(_fwd(ours, jnp.asarray(x2), jnp.asarray(t2), jnp.asarray(y2)))
    assert _max_err(out2, ref2) < TOL
    assert _max_err(out2[:2], out2[2:]) > 1e-3  # the null class matters

    # The official convention (shift 0) differs measurably from diffusers': the option is real.
    ours.timestep_freq_shift = ours.t_embedder.freq_shift = 0
    assert _max_err(_fwd(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)), ref) > 1e-3


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


def _official_state_dict(ref_model) -> dict[str, torch.Tensor]:
    """Renames a diffusers DiT's weights to the facebookresearch/DiT layout (incl. its pos_embed buffer)."""
    sd = ref_model.state_dict()
    e = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "pos_embed": ref_model.pos_embed.pos_embed.detach().clone(),
           "y_embedder.embedding_table.weight": sd[e + "class_embedder.embedding_table.weight"]}
    for i, j in ((0, 1), (2, 2)):
        for w in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{w}"] = sd[f"{e}timestep_embedder.linear_{j}.{w}"]
    for b in range(len(ref_model.transformer_blocks)):
        src = f"transformer_blocks.{b}."
        for w in ("weight", "bias"):
            out[f"blocks.{b}.attn.qkv.{w}"] = torch.cat([sd[f"{src}attn1.to_{n}.{w}"] for n in "qkv"])
            for ours, theirs in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
                                 ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm1.linear")):
                out[f"blocks.{b}.{ours}.{w}"] = sd[f"{src}{theirs}.{w}"]
    for w in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{w}"] = sd[f"proj_out_1.{w}"]
        out[f"final_layer.linear.{w}"] = sd[f"proj_out_2.{w}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_official_checkpoint_conversion(tmp_path, capsys):
    cfg = PARITY_CONFIGS[0]
    ref_model = _diffusers_dit(*cfg, seed=3)
    torch.save(_official_state_dict(ref_model), tmp_path / "in.pt")
    out_path = str(tmp_path / "out.safetensors")
    # input_size comes from pos_embed; the head count is not in the weights.
    assert convert_cli.main(["dit", str(tmp_path / "in.pt"), out_path, "--model", f"num_heads={cfg[1]}"]) == 0
    assert "official format" in capsys.readouterr().out

    x, t, y = _inputs(cfg)
    ref = _torch_forward(ref_model, x, t, y)
    official = load_dit(out_path)  # the official timestep convention, as converted checkpoints run
    assert official.timestep_freq_shift == 0 and official.input_size == cfg[4]
    # Against diffusers, switch our model to diffusers' convention explicitly; tolerance unchanged.
    ours = load_dit(out_path, timestep_freq_shift=1)
    err = _max_err(_fwd(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)), ref)
    print(f"official-format conversion vs diffusers: {err:.2e}")
    assert err < TOL
    # Both import routes give identical parameters.
    a = flatten(nnx.state(official, nnx.Param).to_pure_dict())
    b = flatten(convert_diffusers_dit({k: v.numpy() for k, v in ref_model.state_dict().items()}))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_conversion_errors_name_the_keys():
    ref_model = _diffusers_dit(*PARITY_CONFIGS[0])
    sd = {k: v.numpy() for k, v in _official_state_dict(ref_model).items()}
    convert_official_dit(sd)  # the clean dict converts
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    sd["blocks.0.attn.proj.weight"] = np.zeros((64, 63), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_official_dit(sd)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.attn.extra.weight" in msg
    assert "blocks.0.attn.proj.weight" in msg and "misshaped" in msg

    dsd = {k: v.numpy().copy() for k, v in ref_model.state_dict().items()}
    dsd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0  # untied embedders
    with pytest.raises(ConversionError, match="embedders differ"):
        convert_diffusers_dit(dsd)
    # Block 0's embedder missing: reported as missing keys (not a KeyError from the tie check).
    key0 = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.bias"
    del dsd[key0]
    with pytest.raises(ConversionError, match="missing") as e:
        convert_diffusers_dit(dsd)
    assert key0 in str(e.value)


def test_training_checkpoint_reads_ema(tmp_path):
    """DiT training checkpoints {"model", "ema", "opt", "args"} load (args is an argparse.Namespace) and
    give the EMA weights; weights_only stays on, so other pickled objects are still refused."""
    import argparse

    from msf_jax.convert.common import read_torch_state_dict

    model = torch.nn.Linear(3, 2)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "ema": ema, "opt": torch.optim.AdamW(model.parameters()).state_dict(),
                "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)}, tmp_path / "ckpt.pt")
    sd = read_torch_state_dict(str(tmp_path / "ckpt.pt"))
    assert sorted(sd) == ["bias", "weight"] and np.array_equal(sd["bias"], ema["bias"].numpy())
    torch.save({"x": ConversionError("not a tensor")}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not a readable PyTorch weights file"):
        read_torch_state_dict(str(tmp_path / "other.pt"))


# ------------------------------------------------------------------------------------------------
# Init and options
# ------------------------------------------------------------------------------------------------


def test_init_is_dit_init():
    model = _tiny(hidden_size=64, num_heads=4)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    out = _fwd(model, x, jnp.array([3, 700]), jnp.array([2, 10]))
    assert out.shape == (2, 8, 8, 8) and np.all(np.asarray(out) == 0.0)  # adaLN-Zero: exactly 0
    p = nnx.state(model, nnx.Param).to_pure_dict()
    for block in p["blocks"].values():
        assert not np.any(block["adaLN_modulation"]["kernel"]) and not np.any(block["adaLN_modulation"]["bias"])
        assert not np.any(block["attn"]["qkv"]["bias"])
        # xavier-uniform over the fused (D, 3D) matrix: bound sqrt(6 / (D + 3D))
        bound = np.sqrt(6 / (64 + 192))
        assert 0.5 * bound < np.abs(block["attn"]["qkv"]["kernel"]).max() <= bound + 1e-6
    assert not np.any(p["final_layer"]["linear"]["kernel"])
    assert not np.any(p["final_layer"]["adaLN_modulation"]["kernel"])
    # patch embedding as a (C p², D) matrix: bound sqrt(6 / (16 + 64))
    bound = np.sqrt(6 / (16 + 64))
    assert 0.5 * bound < np.abs(p["x_embedder"]["kernel"]).max() <= bound + 1e-6
    assert abs(float(np.std(p["y_embedder"]["embedding_table"]["embedding"])) - 0.02) < 0.005
    assert p["y_embedder"]["embedding_table"]["embedding"].shape == (11, 64)  # + null class
    assert abs(float(np.std(p["t_embedder"]["linear_1"]["kernel"])) - 0.02) < 0.003
    no_null = _tiny(abstract=True, class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.embedding.shape == (10, 32)
    assert model.supports_guidance and not no_null.supports_guidance  # no null-class row, no CFG


def test_label_dropout():
    model = _randomize(_tiny(abstract=True, class_dropout_prob=0.25))
    labels = jnp.zeros((20000,), jnp.int32) + 3
    dropped = model.y_embedder.token_drop(labels, jax.random.key(1))
    frac = float(jnp.mean(dropped == 10))
    assert 0.23 < frac < 0.27 and bool(jnp.all((dropped == 3) | (dropped == 10)))
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 4))
    t, y = jnp.full((16,), 100), jnp.arange(16) % 10
    base = _fwd(model, x, t, y)
    assert _max_err(_fwd(model, x, t, y), base) == 0.0  # no key: deterministic, no dropout
    assert _max_err(_fwd(model, x, t, y, key=jax.random.key(2)), base) > 1e-4


def test_cond_channels_and_noise_cond():
    model = _randomize(_tiny(abstract=True, cond_channels=3, noise_cond=True))
    assert model.x_embedder.kernel.shape == ((4 + 3) * 4, 32)
    k = jax.random.split(jax.random.key(0), 3)
    x, cond = jax.random.normal(k[0], (2, 8, 8, 4)), jax.random.normal(k[1], (2, 8, 8, 3))
    t, y, level = jnp.array([5, 500]), jnp.array([0, 1]), jnp.array([0.0, 250.5])
    out = _fwd(model, x, t, y, cond, level)
    assert out.shape == (2, 8, 8, 8)  # output channels follow in_channels only
    assert _max_err(_fwd(model, x, t, y, cond * 0.5, level), out) > 1e-4
    assert _max_err(_fwd(model, x, t, y, cond, level + 100.0), out) > 1e-4
    with pytest.raises(ValueError):
        model(x, t, y, None, level)
    with pytest.raises(ValueError):
        model(x, t, y, cond)


def test_logical_partition_specs():
    model = _tiny(abstract=True, cond_channels=4, noise_cond=True)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    params = flatten(nnx.state(model, nnx.Param).to_pure_dict())
    leaves = jax.tree.leaves_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(leaves) == len(params)
    logical = {a for a, _ in axes.DEFAULT_RULES}
    rules = dict(axes.DEFAULT_RULES)
    for path, spec in leaves:
        names = tuple(spec)
        assert names and all(n in logical for n in names), (path, spec)
        mesh_axes = [rules[n] for n in names if rules[n]]
        assert len(mesh_axes) == len(set(mesh_axes)), (path, spec)  # never one mesh axis twice
    p = nnx.get_partition_spec(nnx.state(model, nnx.Param)).to_pure_dict()
    assert tuple(p["blocks"][0]["attn"]["qkv"]["kernel"]) == (axes.EMBED, axes.HEADS)
    assert tuple(p["x_embedder"]["kernel"]) == (axes.PATCH, axes.EMBED)
    assert tuple(p["y_embedder"]["embedding_table"]["embedding"]) == (axes.CLASSES, axes.EMBED)


def test_registry_and_flops():
    assert len(DIT_CONFIGS) == 12
    assert {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} == set(DIT_CONFIGS)
    assert DIT_CONFIGS["DiT-XL/2"] == dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)
    cfg = dict(name="DiT-S/8", depth=0, hidden_size=0, num_heads=0, patch_size=0, mlp_ratio=4.0,
               class_dropout_prob=0.1, learn_sigma=True)
    model = nnx.eval_shape(lambda: dit_from_config(cfg, input_size=32, in_channels=4, num_classes=1000,
                                                   rngs=nnx.Rngs(0)))
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (12, 384, 6, 8)
    assert model.x_embedder.kernel.shape == (4 * 64, 384)
    small = nnx.eval_shape(lambda: dit_from_config({**cfg, "patch_size": 4, "depth": 2}, input_size=32,
                                                   in_channels=4, num_classes=10, rngs=nnx.Rngs(0)))
    assert (small.patch_size, small.depth) == (4, 2)
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_from_config({**cfg, "name": "DiT-XXL/2"}, input_size=32, in_channels=4, num_classes=10,
                        rngs=nnx.Rngs(0))
    # The DiT paper's 118.6 GFLOPs for DiT-XL/2 at 256 px counts multiply-adds: 2x that in FLOPs.
    xl = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16)
    assert abs(dit_flops_per_example(xl) / 2e9 - 118.6) < 0.5
    assert dit_flops_per_example(model) == dit_flops_per_example(model.config)


def test_defaults_stated_once():
    """configs/default.py's DiT fields, dit_from_config's fallbacks and DiT's signature agree: a default
    changed in DiT.__init__ changes everywhere or fails here (the config writes its values out so that
    it parses without Flax)."""
    import inspect

    from configs.default import stage_config

    sig = {p.name: p.default for p in inspect.signature(DiT.__init__).parameters.values()}
    stream_dtypes = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
    model_cfg = stage_config("DiT-S/8").model
    assert set(CONFIG_FIELDS) == set(config_defaults()) and set(CONFIG_FIELDS) <= set(model_cfg)
    for field in CONFIG_FIELDS:
        value = stream_dtypes[model_cfg[field]] if field == "stream_dtype" else model_cfg[field]
        assert value == sig[field] and type(value) is type(sig[field]), (field, value, sig[field])
    # The fields left out, None or "" fall back to the same defaults; the default config builds the same.
    for cfg in ({"name": "DiT-S/8"}, {"name": "DiT-S/8", **{f: None for f in CONFIG_FIELDS}}, model_cfg):
        model = nnx.eval_shape(lambda: dit_from_config(cfg, input_size=16, in_channels=4, num_classes=10,
                                                       rngs=nnx.Rngs(0)))
        built = dict(mlp_ratio=model.mlp_ratio, class_dropout_prob=model.class_dropout_prob,
                     learn_sigma=model.learn_sigma, attention=model.blocks[0].attn.impl,
                     remat_policy=model.remat_policy, stream_dtype=None if model.stream_dtype is model.dtype
                     else model.stream_dtype)
        assert built == {f: sig[f] for f in CONFIG_FIELDS}, cfg
    # Explicit values still win (0 and False are values, not "unset").
    model = nnx.eval_shape(lambda: dit_from_config(
        {"name": "DiT-S/8", "class_dropout_prob": 0.0, "learn_sigma": False, "stream_dtype": "float32"},
        input_size=16, in_channels=4, num_classes=10, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert (model.class_dropout_prob, model.learn_sigma, model.stream_dtype) == (0.0, False, jnp.float32)
    with pytest.raises(ValueError, match="stream_dtype"):
        dit_from_config({"name": "DiT-S/8", "stream_dtype": "fp8"}, input_size=16, in_channels=4,
                        num_classes=10, rngs=nnx.Rngs(0))


def test_bf16_and_remat():
    model = _randomize(_tiny(abstract=True, depth=1))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([5, 900]), jnp.array([0, 10])
    ref = _fwd(model, x, t, y)
    state = nnx.state(model, nnx.Param)
    bf16 = nnx.merge(nnx.graphdef(_tiny(abstract=True, depth=1, dtype=jnp.bfloat16)), state)
    out = _fwd(bf16, x, t, y)
    assert out.dtype == jnp.float32 and bf16.x_embedder.kernel.dtype == jnp.float32  # f32 params
    assert _max_err(out, ref) < 0.05 * float(jnp.abs(ref).max())
    remat = nnx.merge(nnx.graphdef(_tiny(abstract=True, depth=1, remat=True)), state)

    @nnx.jit
    def grad(m):
        return nnx.grad(lambda m: jnp.mean(m(x, t, y) ** 2))(m)

    g_ref, g_remat = grad(model), grad(remat)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
