"""--mode=sweep: the grid, the table, the Pareto front, the plot, resuming, and no recompilation."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from msf_jax import stages
from msf_jax.factorize import Factorizer
from msf_jax.jobs import frontier
from msf_jax.jobs import sample as sample_lib
from msf_jax.jobs import sweep as sweep_lib
from msf_jax.diffusion import SAMPLERS, FlowMatching, GaussianDiffusion
from msf_jax.jobs.sweep_sampler import StageRun, SweepSampler, count_model_calls
from msf_jax.models.dit import dit_flops_per_example
from tests.tiny import tiny_config


def _randomized(model, seed):
    """DiT zero-initializes its output layers; perturb every parameter so samples depend on the model."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                  for x, k in zip(leaves, keys)]))
    return model


def _config():
    config = tiny_config()
    for name in ("base", "dit"):  # flow + Heun for the base and the DiT, so Heun is covered
        config[name].process, config[name].sampler, config[name].model.learn_sigma = "flow", "heun", False
    config.eval.metric = "swd"
    config.sample.batch_size = 4
    s = config.sweep
    s.num_samples = 6  # not a multiple of the batch: the last batch is padded
    s.base_steps, s.base_guidance, s.tie_guidance = "2,3", "1.5,2.5", True  # the 2x2 grid
    s.sample_level = "0,0.1"
    s.dit_steps, s.dit_guidance = "2", "1.5,2.5"
    return config


@pytest.fixture(scope="module")
def setup():
    config = _config()
    factorizer = Factorizer.from_config(config.factorizer)
    models = {name: _randomized(stages.make_stage(config, name, factorizer).build_model(seed=i), seed=10 + i)
              for i, name in enumerate(("base", "residual", "dit"))}
    one_device = Mesh(np.asarray(jax.devices()[:1]), ("data",))  # compiles faster; 8 devices below
    return config, models, factorizer, SweepSampler(config, models, factorizer, mesh=one_device)


def test_grid_settings():
    config = _config()
    settings = sweep_lib.grid_settings(config, msf=True, dit=True)
    assert len(settings) == 2 * 2 * 2 + 2 and len({s.id for s in settings}) == len(settings)
    first = settings[0].stage_runs
    assert first["base"] == StageRun("heun", 2, 1.5) and first["residual"] == StageRun("euler", 3, 1.5)
    assert settings[0].label == "MSF 2+3 g1.5/1.5" and settings[1].label == "MSF 2+3 g1.5/1.5 l0.1"
    config.sweep.tie_guidance, config.sweep.residual_guidance = False, "1,4"
    assert len(sweep_lib.grid_settings(config, msf=True, dit=False)) == 16
    config.sweep.base_steps = "2,x"
    with pytest.raises(ValueError, match="base_steps|list of int"):
        sweep_lib.grid_settings(config, msf=True, dit=False)


def test_pareto_front():
    costs, qual = [1, 2, 3, 2, 4, 4], [5, 3, 3, 4, 1, 1]
    assert frontier.pareto_front(costs, qual) == [0, 1, 4, 5]  # 2 and 3 dominated by 1; 4 == 5 kept
    assert frontier.pareto_front([1, 2], [float("nan"), 1]) == [1]


def test_sweep_images_match_mode_sample(setup):
    """A setting's images are those of the Generator with the same values in the config."""
    config, models, factorizer, sampler = setup
    idx = np.arange(5)
    labels = sample_lib.labels_for_indices(idx, config.data.num_classes, "balanced", config.seed)
    cfg = config.copy_and_resolve_references()
    cfg.base.num_sampling_steps, cfg.base.guidance_scale = 3, 2.5
    cfg.residual_cond.sample_level = 0.1
    expected = sample_lib.Generator(cfg, stages.build_stages(cfg, factorizer), [models["base"], models["residual"]],
                                    mesh=sampler.mesh)(idx, labels)
    got = sampler({"base": StageRun("heun", 3, 2.5), "residual": StageRun("euler", 3, 1.5)}, 0.1, idx, labels)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # traced vs constant scale: rounding
    assert np.mean(got == expected) > 0.99


def test_cost_counts_model_calls(setup, monkeypatch):
    """Cost = model calls x the analytic FLOPs of one call (x 2 guided); XLA's figure beside it on CPU."""
    config, models, _, sampler = setup
    heun = [sampler.model_calls("base", StageRun("heun", n, 1.0)) for n in (2, 3, 4)]
    assert heun[1] - heun[0] == heun[2] - heun[1] == 2  # two evaluations per Heun step
    assert sampler.model_calls("residual", StageRun("euler", 5, 1.0)) == 5
    for name in ("base", "residual"):
        analytic = dit_flops_per_example(models[name])
        assert sampler.call_flops(name, False) == analytic and sampler.call_flops(name, True) == 2 * analytic
        plain, guided = sampler.xla_call_flops(name, False), sampler.xla_call_flops(name, True)
        assert 0.9 * analytic < plain < 1.5 * analytic  # XLA also counts the elementwise work
        assert guided == pytest.approx(2 * plain, rel=0.05)  # CFG doubles the batch
    runs = {"base": StageRun("heun", 3, 2.0), "residual": StageRun("euler", 3, 1.0)}
    cost = sampler.cost(runs)
    base, residual = dit_flops_per_example(models["base"]), dit_flops_per_example(models["residual"])
    assert cost["base_calls"] == 5 and cost["residual_calls"] == 3  # Heun 3 ending with Euler: 2 + 2 + 1
    assert cost["flops_per_image"] == 5 * 2 * base + 3 * residual
    assert cost["xla_flops_per_image"] == pytest.approx(
        5 * sampler.xla_call_flops("base", True) + 3 * sampler.xla_call_flops("residual", False))
    assert 0.9 < cost["xla_flops_per_image"] / cost["flops_per_image"] < 1.5
    # Off CPU (XLA:GPU undercounts matmuls, fused attention hides its FLOPs) only the analytic count.
    monkeypatch.setattr(SweepSampler, "xla_cost_is_reliable", lambda self: False)
    assert sampler.cost(runs) == {k: v for k, v in cost.items() if k != "xla_flops_per_image"}


def test_model_calls_of_every_process_and_sampler():
    """Every sampler a config can name is counted, with and without learned sigma (Gaussian: 2C outputs)."""
    n = 3
    per_step = {"ddpm": 1, "ddim": 1, "euler": 1, "heun": 2, "dpm2m": 1, "sde": 1}
    assert set(per_step) == {s for names in SAMPLERS.values() for s in names}  # a new sampler needs a line here
    for kind, names in SAMPLERS.items():
        for learn_sigma in (False, True):
            process = (GaussianDiffusion.dit(1000, learn_sigma=learn_sigma) if kind == "gaussian"
                       else FlowMatching(learn_sigma=learn_sigma))
            for sampler in names:
                assert count_model_calls(process, sampler, n, "heun") == per_step[sampler] * n, (kind, sampler, learn_sigma)
    assert count_model_calls(FlowMatching(), "heun", n, heun_final_step="euler") == 2 * n - 1


def test_sweep_of_learned_sigma_gaussian_stages(tmp_path):
    """The ImageNet configs' stages (Gaussian, learned sigma, DDPM/DDIM, guided) sweep end to end."""
    config = tiny_config()  # base and dit: gaussian ddpm with learned sigma, as configs/default.py
    config.residual.process, config.residual.sampler, config.residual.model.learn_sigma = "gaussian", "ddim", True
    config.dit.sampler = "ddim"
    config.eval.metric, config.sample.batch_size = "swd", 2
    s = config.sweep
    s.num_samples, s.base_steps, s.residual_steps, s.dit_steps = 2, "2", "2", "2"
    factorizer = Factorizer.from_config(config.factorizer)
    models = {name: stages.make_stage(config, name, factorizer).build_model(seed=i)
              for i, name in enumerate(("base", "residual", "dit"))}
    assert all(m.out_channels == 2 * m.in_channels for m in models.values())
    sampler = SweepSampler(config, models, factorizer, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    rows = sweep_lib.run_sweep(config, str(tmp_path / "run"), sampler=sampler)["rows"]
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"msf_ddpm2_g1.5_ddim2_g1.5_l0", "dit_ddim2_g1.5"}
    assert by_id["dit_ddim2_g1.5"]["dit_calls"] == 2 and by_id["msf_ddpm2_g1.5_ddim2_g1.5_l0"]["base_calls"] == 2
    assert all(np.isfinite(r["quality"]) and r["flops_per_image"] > 0 for r in rows)


def test_sweep_table_front_plot_resume_and_no_recompilation(setup, tmp_path):
    config, _, _, sampler = setup
    traces_before = sampler.traces
    workdir = str(tmp_path / "run")

    class Killed(Exception):
        pass

    def kill_after_first(row):
        raise Killed

    with pytest.raises(Killed):  # a sweep killed after its first setting
        sweep_lib.run_sweep(config, workdir, sampler=sampler, on_result=kill_after_first)
    settings_dir = os.path.join(workdir, "sweep", "settings")
    assert len(os.listdir(settings_dir)) == 1

    scored = []
    result = sweep_lib.run_sweep(config, workdir, sampler=sampler, on_result=scored.append)
    assert len(scored) == 9  # the rerun skipped the finished setting
    rows = result["rows"]
    assert len(rows) == 10 and {r["family"] for r in rows} == {"msf", "dit"}
    # Guidance and sample_level are arguments: one program per (family, steps), none per value.
    assert sampler.traces - traces_before <= 3

    # The table: CSV and JSON agree, every row is scored and costed.
    with open(result["paths"]["csv"]) as f:
        table = list(csv.DictReader(f))
    with open(result["paths"]["json"]) as f:
        js = json.load(f)
    assert [r["id"] for r in table] == [r["id"] for r in js["rows"]] == [r["id"] for r in rows]
    for r in js["rows"]:
        assert r["quality"] > 0 and r["flops_per_image"] > 0 and r["images_per_s"] > 0 and r["metric"] == "SWD"
        assert 0.9 < float(r["xla_flops_per_image"]) / r["flops_per_image"] < 1.5  # the check column (CPU)
        assert r["quality"] == pytest.approx(r["swd/mean"])
    by_id = {r["id"]: r for r in rows}
    cheap, dear = by_id["msf_heun2_g1.5_euler3_g1.5_l0"], by_id["msf_heun3_g1.5_euler3_g1.5_l0"]
    assert dear["flops_per_image"] > cheap["flops_per_image"]
    assert by_id["msf_heun2_g2.5_euler3_g2.5_l0"]["flops_per_image"] == cheap["flops_per_image"]
    assert by_id["msf_heun2_g1.5_euler3_g1.5_l0.1"]["quality"] != cheap["quality"]  # the level matters

    # The front: exactly the non-dominated rows.
    def dominates(a, b):
        return (a["flops_per_image"] <= b["flops_per_image"] and a["quality"] <= b["quality"]
                and (a["flops_per_image"] < b["flops_per_image"] or a["quality"] < b["quality"]))

    for r in rows:
        assert r["on_front"] == (not any(dominates(o, r) for o in rows))
    assert js["front"] and set(js["front"]) == {r["id"] for r in rows if r["on_front"]}

    # The plot is a PNG.
    with open(result["paths"]["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(result["paths"]["plot"]) as img:
        assert img.format == "PNG" and img.size == (960, 620)

    # A lost result is recomputed, and only it; the same setting scores the same.
    lost = js["front"][0]
    os.remove(os.path.join(settings_dir, f"{lost}.json"))
    scored.clear()
    again = sweep_lib.run_sweep(config, workdir, sampler=sampler, on_result=scored.append)
    assert [r["id"] for r in scored] == [lost]
    assert scored[0]["quality"] == pytest.approx(by_id[lost]["quality"])
    assert again["front"] == result["front"] or lost in again["front"]
    assert sampler.traces - traces_before <= 3  # nothing recompiled on rerun

    # A smaller grid in the same workdir: its settings are reused, the earlier ones stay in the table.
    config.sweep.base_steps, scored[:] = "2", []
    smaller = sweep_lib.run_sweep(config, workdir, sampler=sampler, on_result=scored.append)
    assert not scored and len(smaller["rows"]) == 10
    config.sweep.base_steps = "2,3"

    # Other samples in the same workdir are refused, and so is any other field the sampler reads but
    # the grid does not decide.
    for section, field, value in (("sweep", "num_samples", 4), ("base", "heun_final_step", "heun"),
                                  ("residual", "ddim_eta", 0.5), ("dit", "guidance_channels", 1)):
        changed = config.copy_and_resolve_references()
        changed[section][field] = value
        name = "num_samples" if section == "sweep" else rf"{section}\.{field}"
        with pytest.raises(ValueError, match=rf"holds a sweep made with other settings \({name}\)"):
            sweep_lib.run_sweep(changed, workdir, sampler=sampler)


def test_a_failed_sweep_does_not_bind_its_workdir(tmp_path):
    """Without checkpoints the sweep fails before it starts and writes no run spec."""
    config = _config()
    with pytest.raises(ValueError, match="sample.base_checkpoint"):
        sweep_lib.run_sweep(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "sweep" / "run_spec.json")


def test_mode_sweep_from_converted_files(tmp_path):
    """--mode=sweep loads the stages as --mode=sample does (here converted files) and writes its outputs."""
    from msf_jax.convert.common import save_params
    from msf_jax.main import _run_mode

    config = _config()
    config.factorizer.standardize = False
    config.sweep.num_samples, config.sweep.sample_level, config.sweep.dit_steps = 4, "", ""
    config.sweep.base_steps, config.sweep.base_guidance = "2", "1.5,2.5"
    config.sample.batch_size = 2  # on the 8 test devices: padded to 8
    factorizer = Factorizer.from_config(config.factorizer)
    for i, name in enumerate(("base", "residual")):
        model = _randomized(stages.make_stage(config, name, factorizer).build_model(), i)
        path = str(tmp_path / f"{name}.safetensors")
        save_params(path, nnx.state(model, nnx.Param).to_pure_dict(), model.config)
        config.sample[f"{name}_checkpoint"] = path
    _run_mode("sweep", config, str(tmp_path / "out"))
    with open(tmp_path / "out" / "sweep" / "sweep.json") as f:
        assert len(json.load(f)["rows"]) == 2
    assert os.path.exists(tmp_path / "out" / "sweep" / "frontier.png")


def test_sweep_on_object_store(setup, fake_gcs, tmp_path, monkeypatch):
    """A gs:// workdir: every output lands in the store, committed; a rerun trusts only committed results."""
    from msf_jax.runtime import paths

    _, _, _, sampler = setup
    root, seen = fake_gcs
    monkeypatch.chdir(tmp_path)
    config = _config()
    config.sweep.num_samples, config.sweep.sample_level = 4, "0"
    config.sweep.base_steps, config.sweep.base_guidance, config.sweep.dit_guidance = "2", "1.5", "1.5"
    scored = []
    result = sweep_lib.run_sweep(config, "gs://bucket/run", sampler=sampler, on_result=scored.append)
    ids = ["msf_heun2_g1.5_euler3_g1.5_l0", "dit_heun2_g1.5"]
    assert [r["id"] for r in scored] == ids
    assert result["paths"] == {"csv": "gs://bucket/run/sweep/sweep.csv", "json": "gs://bucket/run/sweep/sweep.json",
                               "plot": "gs://bucket/run/sweep/frontier.png"}
    store = root / "bucket/run/sweep"
    for name in ["run_spec.json", "sweep.csv", "sweep.json", "frontier.png"] + [f"settings/{i}.json" for i in ids]:
        assert (store / name).exists() and (store / (name + ".committed")).exists(), name
    assert (store / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["id"] for r in paths.read_json(result["paths"]["json"])["rows"]] == ids
    assert not (tmp_path / "gs:").exists() and all(p.startswith("gs://bucket/run") for p in seen)

    scored.clear()  # a rerun scores nothing new
    again = sweep_lib.run_sweep(config, "gs://bucket/run", sampler=sampler, on_result=scored.append)
    assert not scored and [r["quality"] for r in again["rows"]] == [r["quality"] for r in result["rows"]]
    (store / f"settings/{ids[1]}.json.committed").unlink()  # its writer was killed before the marker
    sweep_lib.run_sweep(config, "gs://bucket/run", sampler=sampler, on_result=scored.append)
    assert [r["id"] for r in scored] == [ids[1]] and paths.is_committed(f"gs://bucket/run/sweep/settings/{ids[1]}.json")
