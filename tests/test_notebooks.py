"""The Colab notebooks run end to end: their code cells are executed in order, as a kernel would.

MSF_JAX_NOTEBOOK_TEST=1 is the notebooks' own switch: the install cell installs nothing and the
training is shrunk. The pretrained-DiT notebook downloads only files it does not have, so tiny
random checkpoints in the official layouts (a DiT `.pt` state_dict, a diffusers VAE folder), made
here, stand in for the downloads: no network.
"""

import importlib.metadata
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("colab_demo.ipynb", "colab_pretrained_dit.ipynb")


def _cells(name: str, kind: str = "code") -> list[str]:
    with open(os.path.join(REPO, "launch", name)) as f:
        nb = json.load(f)
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def _run(name: str, tmp_path, monkeypatch) -> tuple[dict, list]:
    monkeypatch.setenv("MSF_JAX_NOTEBOOK_TEST", "1")
    monkeypatch.chdir(tmp_path)
    shown = []
    namespace = {"__name__": "__main__", "display": shown.append}  # `display` is an IPython builtin
    for i, source in enumerate(_cells(name)):
        exec(compile(source, f"{name} code cell {i}", "exec"), namespace)  # pylint: disable=exec-used
    return namespace, shown


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_ready_to_run_on_colab(name):
    first_markdown = _cells(name, "markdown")[0]
    assert f"colab.research.google.com/github/msf-jax/msf_jax/blob/main/launch/{name}" in first_markdown
    install = _cells(name)[0]
    assert re.search(r'^REPO_URL = "https://github\.com/[\w-]+/[\w-]+"$', install, re.M)
    assert re.search(r'^REPO_REF = "[\w.-]+"$', install, re.M)
    # Colab's own TensorFlow (and JAX, PyTorch) are left alone: never a requirement here.
    assert not re.search(r'"(tensorflow|tensorflow-cpu|jax|jaxlib|torch)\b(?!-datasets)', install)
    assert "--no-deps" in install
    for source in _cells(name):
        assert not re.search(r"^\s*[!%]", source, re.M), "shell/magic lines do not run outside IPython"
        assert not re.search(r"REPLACE|YOUR_|TODO|<[a-z_ ]+>", source), source


def test_install_cell_leaves_jax_alone(tmp_path, monkeypatch):
    """The install cell's pip call holds the installed JAX stack: resolved by pip's dry run (nothing
    installed) with the cell's own constraints, flax keeps this jax; against an older pinned jax that
    flax>=0.12 cannot use, pip refuses instead of installing a newer jax over it."""
    install = _cells(NOTEBOOKS[0])[0]
    assert all(_cells(name)[0] == install for name in NOTEBOOKS)
    monkeypatch.setenv("MSF_JAX_NOTEBOOK_TEST", "1")
    namespace = {"__name__": "__main__"}
    exec(compile(install, "install cell", "exec"), namespace)  # pylint: disable=exec-used
    pins = namespace["jax_constraints"]()
    here = {n: importlib.metadata.version(n) for n in ("jax", "jaxlib")}
    assert {f"jax=={here['jax']}", f"jaxlib=={here['jaxlib']}"} <= set(pins), pins

    def dry_run(constraints):
        path, report = tmp_path / "constraints.txt", tmp_path / "report.json"
        path.write_text("\n".join(constraints) + "\n")
        command = namespace["pip_install_command"](["flax>=0.12"], str(path))
        r = subprocess.run(command + ["--dry-run", "--ignore-installed", "--report", str(report)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode and "ResolutionImpossible" not in r.stderr:
            pytest.skip(f"pip cannot resolve against a package index here: {r.stderr.strip().splitlines()[-1:]}")
        return r, report

    r, report = dry_run(pins)
    assert r.returncode == 0, r.stderr
    with open(report) as f:
        resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(f)["install"]}
    assert resolved["jax"] == here["jax"] and resolved["jaxlib"] == here["jaxlib"]
    r, _ = dry_run(["jax==0.4.30", "jaxlib==0.4.30"])  # an older runtime's jax
    assert r.returncode != 0 and "ResolutionImpossible" in r.stderr


def test_demo_notebook(tmp_path, monkeypatch):
    namespace, shown = _run("colab_demo.ipynb", tmp_path, monkeypatch)
    metrics = namespace["metrics"]
    assert metrics["swd"]["samples_vs_real"] > 0
    assert len(shown) == 2 and all(image.size[0] > 100 for image in shown)  # components figure, grid
    assert os.path.exists(tmp_path / "demo_out" / "demo_components.png")


def _fake_downloads(weights):
    """Tiny random stand-ins for DiT-XL-2-256x256.pt and sd-vae-ft-ema, in their published layouts."""
    import diffusers

    from tests.test_dit import _official_state_dict

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=64, in_channels=4,
                                          out_channels=8, num_layers=1, sample_size=32, patch_size=2,
                                          num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in dit.parameters():  # DiT zero-initializes its adaLN and output layers: randomize all
            p.normal_(0, 0.02)
    os.makedirs(weights / "sd-vae-ft-ema")
    torch.save(_official_state_dict(dit), weights / "DiT-XL-2-256x256.pt")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=256)
    vae.save_pretrained(weights / "sd-vae-ft-ema", safe_serialization=True)


def test_pretrained_dit_notebook(tmp_path, monkeypatch):
    _fake_downloads(tmp_path / "weights")
    namespace, shown = _run("colab_pretrained_dit.ipynb", tmp_path, monkeypatch)
    images, labels = namespace["images"], namespace["labels"]
    assert images.shape == (len(labels), 256, 256, 3) and images.dtype == np.uint8
    assert images.std() > 0 and namespace["t_batch"] > 0
    assert os.path.exists(tmp_path / "weights" / "dit_xl2_256.safetensors")
    assert len(shown) == 1
