"""FID Inception port: parity with pytorch-fid's network (random weights), resize, weight conversion."""

import inspect
import os

import numpy as np
import pytest

import pytorch_fid.inception as pytorch_fid_inception  # the test extra installs the references
import torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from msf_jax.convert import inception as convert  # noqa: E402
from msf_jax.convert.common import ConversionError  # noqa: E402
from msf_jax.models import inception as model_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fid_inception_v3_random(seed=0):
    """pytorch-fid's `fid_inception_v3()` without the download, every weight and BN statistic random."""
    import torchvision

    pf = pytorch_fid_inception
    net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2048 ** -0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def torch_nets():
    """(Inception3 with fc, pytorch-fid InceptionV3 wrapper sharing its modules)."""
    net = _fid_inception_v3_random()
    orig = pytorch_fid_inception.fid_inception_v3
    pytorch_fid_inception.fid_inception_v3 = lambda: net  # no download
    try:
        wrapper = pytorch_fid_inception.InceptionV3([3]).eval()
    finally:
        pytorch_fid_inception.fid_inception_v3 = orig
    return net, wrapper


@pytest.fixture(scope="module")
def converted(torch_nets, tmp_path_factory):
    net, _ = torch_nets
    path = str(tmp_path_factory.mktemp("inception") / "inception.safetensors")
    sd_path = str(tmp_path_factory.mktemp("inception") / "pt_inception.pth")
    torch.save(net.state_dict(), sd_path)
    summary = convert.convert_file(sd_path, path)
    assert "with 1008-way logits" in summary
    return path


def _torch_features(net, wrapper, images01_nhwc):
    x = torch.from_numpy(images01_nhwc).permute(0, 3, 1, 2).contiguous()
    spatial = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
    with torch.no_grad():
        pool = wrapper(x)[0].flatten(1)
        logits = net.fc(pool)
    hook.remove()
    s = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC flatten, as TF
    return pool.numpy(), logits.numpy(), s.numpy()


@pytest.mark.parametrize("size,n", [(64, 2), (320, 1)])  # upsampling and downsampling to 299
def test_parity_with_pytorch_fid(torch_nets, converted, size, n):
    net, wrapper = torch_nets
    images = np.random.RandomState(size).rand(n, size, size, 3).astype(np.float32)
    ref_pool, ref_logits, ref_spatial = _torch_features(net, wrapper, images)
    model = convert.load_inception(converted, logits_bias=True)
    out = model(jnp.asarray(images))  # eager: no whole-network compile
    assert out["pool"].shape == (n, 2048)
    assert out["spatial"].shape == (n, model_lib.SPATIAL_DIM)
    assert out["logits"].shape == (n, 1008)
    for name, ref in (("pool", ref_pool), ("logits", ref_logits), ("spatial", ref_spatial)):
        got = np.asarray(out[name])
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{size}px {name}: max|diff|/max|ref| = {rel:.2e} (max|ref| {np.abs(ref).max():.3g})")
        assert rel <= 1e-4, (name, rel)
    # ADM's IS logits skip the bias.
    model.logits_bias = False
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images))["logits"]),
                               ref_logits - net.fc.bias.detach().numpy(), rtol=0,
                               atol=1e-4 * np.abs(ref_logits).max())


def test_feature_fn_uint8_and_mesh(converted):
    from jax.sharding import Mesh

    model = convert.load_inception(converted)
    images = np.random.RandomState(0).randint(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
    fn = model_lib.make_feature_fn(model, mesh=mesh)  # 3 images over 2 shards: padded, then trimmed
    out = fn(images)
    ref = model(jnp.asarray(images, jnp.float32) / 255.0)
    assert out["pool"].shape == (3, 2048) and "logits" in out
    np.testing.assert_allclose(np.asarray(out["pool"]), np.asarray(ref["pool"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 64, 48, 3), (1, 320, 310, 3), (1, 299, 299, 3)])
def test_resize_matches_torch_interpolate(shape):
    x = np.random.RandomState(1).rand(*shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                          mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(model_lib.resize_bilinear(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_blocks_prefixed_state_dict_converts_the_same(torch_nets):
    net, wrapper = torch_nets
    a, cfg_a = convert.convert_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
    b, cfg_b = convert.convert_state_dict({k: v.numpy() for k, v in wrapper.state_dict().items()})
    assert cfg_a["with_logits"] and not cfg_b["with_logits"]
    from msf_jax.convert.common import flatten

    fa, fb = flatten(a), flatten(b)
    assert set(fb) == {k for k in fa if not k.startswith("fc/")}
    for k in fb:
        np.testing.assert_array_equal(fa[k], fb[k])
    assert fa["Conv2d_1a_3x3/conv/kernel"].shape == (3, 3, 3, 32)
    assert fa["Mixed_7c/branch_pool/bn/var"].shape == (192,)


def test_conversion_errors_name_keys(torch_nets, tmp_path):
    net, _ = torch_nets
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    missing = dict(sd)
    del missing["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(ConversionError, match=r"missing 1 key.*Mixed_6d/branch1x1/bn/var"):
        convert.convert_state_dict(missing)
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected 1 key.*AuxLogits"):
        convert.convert_state_dict(extra)
    bad = dict(sd, **{"Conv2d_2a_3x3.conv.weight": np.zeros((32, 32, 5, 5), np.float32)})
    with pytest.raises(ConversionError, match=r"misshaped.*Conv2d_2a_3x3/conv/kernel"):
        convert.convert_state_dict(bad)
    with pytest.raises(ConversionError, match="no such file"):
        convert.convert_file(str(tmp_path / "nope.pth"), str(tmp_path / "out.safetensors"))
    # The CLI reports the error on one line.
    from msf_jax.convert.__main__ import main

    assert main(["inception", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors")]) == 1


def test_evaluate_npz_fid_end_to_end(converted, tmp_path, monkeypatch):
    from msf_jax.jobs import evaluate
    from msf_jax.metrics import features

    rng = np.random.RandomState(3)
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=rng.randint(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    np.savez(ref, arr_0=rng.randint(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    # sqrtm of 2048x2048 matrices takes ~20 s each on a shared CPU; its numerics are tested in
    # test_metrics.py, so here only the plumbing is checked.
    seen = []
    monkeypatch.setattr(features, "frechet_distance",  # where FeatureStats.frechet_distance looks it up
                        lambda mu1, s1, mu2, s2: seen.append((mu1.shape, s2.shape)) or 0.0)
    stats = str(tmp_path / "sample_stats.npz")
    out = evaluate.evaluate_npz(str(samples), reference=str(ref), inception_weights=converted,
                                batch_size=5, precision_recall=True, stats_out=stats)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(out)
    assert seen == [((2048,), (2048, 2048)), ((2023,), (2023, 2023))]
    assert np.isfinite(out["inception_score"]) and 0 <= out["precision"] <= 1
    # The saved statistics are an ADM-style reference (mu, sigma, mu_s, sigma_s).
    seen.clear()
    evaluate.evaluate_npz(str(samples), reference=stats, inception_weights=converted, batch_size=5)
    assert seen == [((2048,), (2048, 2048)), ((2023,), (2023, 2023))]
    assert evaluate.FeatureStats.load(stats, "_s").n == 5


def _trace_sqrtm(a, disp=True, blocksize=None):
    """Stand-in for `scipy.linalg.sqrtm` in the FID formula, exact for what FID reads of it (the trace,
    finiteness, the imaginary part) when `a` = S1 S2 has low rank, as with a few images in 2048
    dimensions: Q spans a's range, so a's nonzero eigenvalues are those of Qᵀ a Q (k×k). scipy's sqrtm
    of 2048×2048 takes 20-100 s on 2 shared cores; MSF_JAX_REAL_SQRTM=1 uses it instead."""
    import numpy as np

    k = min(a.shape[0], 64)
    q, _ = np.linalg.qr(a @ np.random.default_rng(0).standard_normal((a.shape[0], k)))
    assert np.abs(a - q @ (q.T @ a)).max() <= 1e-9 * np.abs(a).max(), "rank above the stand-in's 64"
    eig = np.linalg.eigvals(q.T @ a @ q)
    root = q @ np.diag(np.sqrt(np.maximum(eig.real, 0.0))) @ q.T  # trace = sum of sqrt(eigenvalues)
    return (root, 0.0) if disp is False else root


def test_trace_sqrtm_stand_in_matches_scipy():
    from scipy import linalg

    rng = np.random.RandomState(0)
    x1, x2 = rng.randn(6, 96), rng.randn(7, 96) * 2 + 1
    a = np.cov(x1, rowvar=False) @ np.cov(x2, rowvar=False)
    ref = np.trace(linalg.sqrtm(a)).real
    assert np.trace(_trace_sqrtm(a)) == pytest.approx(ref, rel=1e-6)
    assert np.trace(_trace_sqrtm(a, disp=False)[0]) == pytest.approx(ref, rel=1e-6)


def test_evaluate_mode_matches_pytorch_fid(torch_nets, converted, tmp_path, monkeypatch, capsys):
    """`msf-jax --mode=evaluate` against pytorch-fid's own FID path (its `pytorch-fid` command: PNG
    files -> statistics -> FID) on the same images and the same random-weight network: the sample
    statistics and the FID against the same reference statistics agree."""
    import json
    import subprocess
    import sys

    from PIL import Image
    from pytorch_fid import fid_score
    from scipy import linalg

    real_sqrtm = os.environ.get("MSF_JAX_REAL_SQRTM") == "1"
    if not real_sqrtm:
        monkeypatch.setattr(linalg, "sqrtm", _trace_sqrtm)
    net, _ = torch_nets
    monkeypatch.setattr(pytorch_fid_inception, "fid_inception_v3", lambda: net)  # no download
    rng = np.random.RandomState(7)
    n = 4
    samples = rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    refs = (rng.rand(n, 32, 32, 3) * 160 + 40).astype(np.uint8)  # another distribution
    dirs = {}
    for name, images in (("samples", samples), ("refs", refs)):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(dirs[name] / f"{i:03d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=samples)

    def pytorch_fid(*args):  # the `pytorch-fid` command line, in this process (the patched network)
        monkeypatch.setattr(sys, "argv", ["pytorch-fid", "--device=cpu", "--num-workers=0",
                                          f"--batch-size={n}", *map(str, args)])
        fid_score.main()

    ref_stats, pf_stats = tmp_path / "ref_stats.npz", tmp_path / "pf_sample_stats.npz"
    pytorch_fid("--save-stats", dirs["refs"], ref_stats)
    pytorch_fid("--save-stats", dirs["samples"], pf_stats)
    capsys.readouterr()
    pytorch_fid(pf_stats, ref_stats)
    pf_fid = float(capsys.readouterr().out.split("FID:")[1])

    workdir = tmp_path / "eval"
    argv = ["--mode=evaluate", "--config=configs/msf_256.py", f"--workdir={workdir}",
            f"--config.eval.samples={tmp_path / 'samples.npz'}", f"--config.eval.reference={ref_stats}",
            f"--config.eval.inception_weights={converted}", f"--config.eval.batch_size={n}",
            f"--config.eval.num_samples={n}"]
    prelude = "" if real_sqrtm else (
        "import scipy.linalg\n" + inspect.getsource(_trace_sqrtm)
        + "scipy.linalg.sqrtm = _trace_sqrtm\n")
    code = prelude + f"import sys\nfrom msf_jax import main\nsys.argv = {['msf-jax', *argv]!r}\nmain.run()\n"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device: one small compile
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((workdir / "eval" / "results.json").read_text())
    ours = np.load(workdir / "eval" / "sample_stats.npz")
    theirs = np.load(pf_stats)
    mu_rel = np.abs(ours["mu"] - theirs["mu"]).max() / np.abs(theirs["mu"]).max()
    sigma_rel = np.abs(ours["sigma"] - theirs["sigma"]).max() / np.abs(theirs["sigma"]).max()
    fid_rel = abs(results["fid"] - pf_fid) / pf_fid
    print(f"n={n}: mu max rel diff {mu_rel:.2e}, sigma {sigma_rel:.2e}; FID ours {results['fid']:.6g} "
          f"pytorch-fid {pf_fid:.6g} (rel {fid_rel:.2e}; sqrtm: {'scipy' if real_sqrtm else 'stand-in'})")
    assert mu_rel <= 1e-4 and sigma_rel <= 1e-4
    assert fid_rel <= 1e-4
