"""sharding.py: meshes from the config, the rule table from the config, and BatchedFn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from msf_jax.runtime import axes, sharding


def _fn(params, x, y):
    """A per-row function of two batch arguments: (N, 3), (N,) -> {'a': (N, 3), 'b': (N,)}."""
    return {"a": x * params["w"] + y[:, None], "b": jnp.sum(x, axis=1) + params["c"]}


def _ref(params, x, y):
    return {"a": x * params["w"] + y[:, None], "b": x.sum(1) + params["c"]}


@pytest.mark.parametrize("out", ["batch", "replicated"])
def test_batched_fn_pads_shards_and_trims(out):
    mesh = jax.make_mesh((4, 2, 1), axes.MESH_AXES)
    params = {"w": np.arange(3, dtype=np.float32), "c": np.float32(0.5)}
    fn = sharding.BatchedFn(_fn, params, mesh, out=out)
    assert fn.num_shards == 8 and fn.padded_size(3) == 8 and fn.padded_size(9) == 16
    rng = np.random.default_rng(0)
    for n in (3, 8, 11):  # short, exact, over one multiple
        x, y = rng.standard_normal((n, 3)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        result = fn(x, y)
        for k, v in _ref(params, x, y).items():
            assert result[k].shape == v.shape
            np.testing.assert_allclose(np.asarray(result[k]), v, rtol=1e-6)
        spec = result["a"].sharding.spec
        if out == "batch" and n % 8 == 0:  # untrimmed: still split over (data, fsdp)
            assert spec[0] == ("data", "fsdp")
        if out == "replicated":
            assert result["a"].sharding.is_fully_replicated
    # The parameters live once on the mesh, replicated.
    assert fn.params["w"].sharding.is_fully_replicated and len(fn.params["w"].sharding.device_set) == 8


def test_batched_fn_min_batch_compiles_once_and_has_no_implicit_transfers():
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:4])
    params = {"w": jnp.ones(3), "c": jnp.zeros(())}
    fn = sharding.BatchedFn(_fn, params, mesh, min_batch=6)
    x = jnp.arange(18, dtype=jnp.float32).reshape(6, 3)  # a device array: padded on the device
    y = jnp.ones(6)
    x2, y2 = x[:2], y[:2]
    with jax.transfer_guard("disallow"):
        full = fn(x, y)
        last = fn(x2, y2)  # a short last batch: padded to 8 like the full one
    assert fn.jitted._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(last["a"]), np.asarray(full["a"])[:2])
    with pytest.raises(ValueError, match="different lengths"):
        fn(x, y[:3])


def test_batched_fn_extra_arguments_are_traced_not_padded():
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:4])
    fn = sharding.BatchedFn(lambda p, x, scale, table: x * scale + table[1] + p, np.float32(1), mesh)
    x = np.arange(3, dtype=np.float32)  # padded to 4 rows; `table` (8,) is neither padded nor re-put
    table = jax.device_put(jnp.arange(8.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    with jax.transfer_guard("disallow"):
        a = fn(x, extra=(np.float32(2), table))
        b = fn(x, extra=(np.float32(3), table))  # a new value: the same program
    assert fn.jitted._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(jax.device_get(a)), x * 2 + 2)
    np.testing.assert_array_equal(np.asarray(jax.device_get(b)), x * 3 + 2)


def test_batched_fn_compiled_ahead_of_time_runs_without_tracing_again():
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:4])
    traces = []

    def fn(p, x, scale):
        traces.append(1)
        return x * scale + p

    batched = sharding.BatchedFn(fn, np.float32(1), mesh, min_batch=4)
    batched.compile(np.zeros(1, np.float32), extra=(np.float32(0),))  # the shape of any call of <= 4 rows
    x = np.arange(3, dtype=np.float32)
    with jax.transfer_guard("disallow"):
        out = batched(x, extra=(np.float32(2),))
    np.testing.assert_array_equal(np.asarray(jax.device_get(out)), x * 2 + 1)
    assert len(traces) == 1 and batched.jitted._cache_size() == 0  # only the ahead-of-time program ran
    batched(np.arange(6, dtype=np.float32), extra=(np.float32(2),))  # another shape: jitted as usual
    assert len(traces) == 2


def test_local_mesh_and_config_mesh():
    mesh = sharding.local_mesh()
    assert mesh.axis_names == axes.MESH_AXES and mesh.devices.shape == (jax.local_device_count(), 1, 1)
    fn = sharding.BatchedFn(_fn, {"w": np.ones(3, np.float32), "c": np.float32(0)}, None)
    assert fn.mesh.devices.shape == mesh.devices.shape  # None = this host's devices
    config = default.get_config()
    config.mesh.shape = (2, 2, 2)
    assert sharding.create_mesh(config.mesh).devices.shape == (2, 2, 2)
    config.mesh.shape = (-1, 2, 1)
    assert sharding.create_mesh(config.mesh, devices=jax.devices()[:4]).devices.shape == (2, 2, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((4, 4, 1))


def test_rules_come_from_the_config():
    config = default.get_config()
    assert sharding.logical_rules(config) == axes.DEFAULT_RULES  # declared there, not a fallback
    config.mesh.rules = (("embed", None), ("mlp", ["tensor"]), ("heads", ["data", "fsdp"]))  # lists: from JSON
    assert sharding.logical_rules(config) == (("embed", None), ("mlp", ("tensor",)), ("heads", ("data", "fsdp")))
    config.mesh.rules = (("embed", "fspd"),)
    with pytest.raises(ValueError, match="fspd"):
        sharding.logical_rules(config)
    config.mesh.rules = (("embed",),)
    with pytest.raises(ValueError, match="each rule"):
        sharding.logical_rules(config)


def test_a_mesh_that_does_not_fit_the_topology_warns_naming_it(monkeypatch):
    """No silent fallback: when JAX cannot map the shape onto the topology (also splitting physical
    axes), the plain-order mesh comes with a warning that names the shape and the topology."""
    from jax.experimental import mesh_utils

    tried, warnings = [], []

    def unmappable(shape, devices, **kwargs):
        tried.append(kwargs)
        raise NotImplementedError("no mapping of this shape onto the torus")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", unmappable)
    from absl import logging
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    mesh = sharding.make_mesh((2, 4, 1))
    assert mesh.devices.shape == (2, 4, 1) and list(mesh.devices.flat) == jax.devices()
    assert tried == [{}, {"allow_split_physical_axes": True}]
    assert len(warnings) == 1 and "(2, 4, 1)" in warnings[0] and "8 x cpu" in warnings[0].lower(), warnings
    assert "no mapping of this shape" in warnings[0]


def test_describe_topology_names_the_physical_extent():
    class Chip:
        device_kind = "TPU v5p"

        def __init__(self, x, y, z):
            self.coords, self.core_on_chip = (x, y, z), 0

    chips = [Chip(x, y, z) for x in range(2) for y in range(2) for z in range(4)]
    assert sharding.describe_topology(chips) == "16 x TPU v5p, physical 2x2x4"
