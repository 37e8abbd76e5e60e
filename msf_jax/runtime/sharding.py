"""Device mesh, logical-axis rules, parameter shardings, and host-local <-> global batches.

Models name their parameter axes logically (`msf_jax.runtime.axes`); one rule table maps those names onto
the mesh axes (`data`, `fsdp`, `tensor`). The batch is split over (`data`, `fsdp`). The same code
runs on one CPU, on simulated CPU devices, on a GPU cluster and on a multi-slice TPU pod.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msf_jax.runtime import axes


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 in `shape` by the remaining device count; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axes.MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(axes.MESH_AXES)} entries {axes.MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices, but {num_devices} exist")
    return shape


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh of config.mesh (shape, num_slices) over `devices` (default: all)."""
    return make_mesh(mesh_cfg.shape, num_slices=int(mesh_cfg.num_slices), devices=devices)


def local_mesh() -> Mesh:
    """This host's devices on the data axis, (-1, 1, 1): for host-local work (each host encoding its
    own shards, a replicated model scoring a batch) that must not wait on other hosts."""
    return make_mesh((-1, 1, 1), devices=jax.local_devices())


def make_mesh(shape: Sequence[int], *, num_slices: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in `shape` = the remaining devices. With `num_slices` > 1 the
    data axis spans slices (DCN)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(f"mesh: data axis {shape[0]} must be divisible by num_slices={num_slices}")
        per_slice = (shape[0] // num_slices,) + shape[1:]
        device_array = mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1), devices)
    else:
        device_array = _device_mesh(shape, devices)
    return Mesh(device_array, axes.MESH_AXES)


def _device_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """JAX's topology-aware placement (CPU / GPU: device order); on a TPU topology it cannot map, also
    splitting physical axes, and else device order with a warning that names the topology (the mesh
    still works, but its collectives may cross more links than they need to)."""
    errors = []
    for kwargs in ({}, {"allow_split_physical_axes": True}):
        try:
            return mesh_utils.create_device_mesh(shape, devices, **kwargs)
        except (ValueError, NotImplementedError, AssertionError) as e:
            errors.append(e)
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.warning("mesh %s (data, fsdp, tensor) does not fit the device topology %s (%s); the devices are "
                    "laid out in plain order, so collectives may be slow: choose config.mesh.shape to match the "
                    "topology", tuple(shape), describe_topology(devices), errors[-1])
    return np.asarray(devices).reshape(shape)


def describe_topology(devices: Sequence[jax.Device]) -> str:
    """E.g. '16 x TPU v5p, physical 2x2x4' (the extent of the devices' coords where they have them)."""
    text = f"{len(devices)} x {getattr(devices[0], 'device_kind', '?')}"
    coords = [getattr(d, "coords", None) for d in devices]
    if all(c is not None for c in coords) and coords:
        extent = np.max(np.asarray(coords), axis=0) - np.min(np.asarray(coords), axis=0) + 1
        text += ", physical " + "x".join(str(int(n)) for n in extent)
        cores = {getattr(d, "core_on_chip", 0) for d in devices}
        if len(cores) > 1:
            text += f" x {len(cores)} cores per chip"
    return text


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
    """The rule table `config.mesh.rules` ((logical axis, mesh axis | None | tuple of mesh axes), ...),
    checked and as tuples (a config read back from JSON holds lists)."""
    rules = []
    for rule in config.mesh.rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"mesh.rules: each rule is (logical axis, mesh axes), got {rule!r}")
        name, target = rule
        target = tuple(target) if isinstance(target, (list, tuple)) else target
        unknown = [t for t in (target if isinstance(target, tuple) else (target,))
                   if t is not None and t not in axes.MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules: {name!r} -> {target!r}: {unknown} are not mesh axes {axes.MESH_AXES}")
        rules.append((name, target))
    return tuple(rules)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. a 1001-row label table over 4)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(entry if names and dim % size == 0 else None)
    return P(*fitted)


def state_shardings(abstract_state: Any, mesh: Mesh, rules=axes.DEFAULT_RULES) -> Any:
    """NamedShardings for an (abstract) nnx.State, from its logical axis metadata and the rules."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)

    def to_sharding(spec, leaf):
        value = leaf.value if isinstance(leaf, nnx.Variable) else leaf
        spec = spec.value if isinstance(spec, nnx.Variable) else spec
        return NamedSharding(mesh, _fit_spec(spec or P(), tuple(value.shape), mesh))

    is_leaf = lambda x: isinstance(x, (nnx.Variable, P))  # noqa: E731
    return jax.tree.map(to_sharding, specs, abstract_state, is_leaf=is_leaf)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract_tree` carrying the matching NamedShardings (one per array leaf)."""
    leaves, treedef = jax.tree.flatten(abstract_tree)
    sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(sh) != len(leaves):
        raise ValueError(f"{len(sh)} shardings for {len(leaves)} arrays")
    return treedef.unflatten([jax.ShapeDtypeStruct(l.shape, l.dtype, sharding=s) for l, s in zip(leaves, sh)])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(axes.BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Builds global arrays from each host's slice of the batch (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()}


def traced_on(mesh: Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with `mesh` as JAX's context mesh while it runs, for functions handed to `jax.jit`: model
    code that splits its own work per device reads it at trace time (the splash attention kernel runs
    under shard_map on it; msf_jax.models.attention). Only the trace sees it: `jax.set_mesh` would
    also place every eager array on the mesh."""

    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: those of `axes.BATCH_AXES` the mesh has."""
    return tuple(a for a in axes.BATCH_AXES if a in mesh.axis_names)


class BatchedFn:
    """`fn(params, *batch)` jitted with `params` replicated and each batch argument split over the mesh.

    The one helper for "replicated weights, batch-sharded input, padded last batch" (VAE encode and
    decode, Inception features, latent extraction, sampling, in-training eval):

        graphdef, state = nnx.split(model)
        encode = BatchedFn(lambda s, x: nnx.merge(graphdef, s).encode_moments(x), state, mesh)
        mean, logvar = encode(images)                    # images (N, H, W, 3), any N

    fn(params, *xs) -> a pytree of arrays whose leading axis is the batch. params (any pytree, e.g.
    an nnx.State) are put on the mesh once, replicated, and passed to the compiled program as an
    argument (never baked in as constants). Each call:
      * pads every x in `xs` along axis 0 to max(N, min_batch) rounded up to a multiple of the batch
        shards (the product of the mesh's data and fsdp sizes), repeating the last row (valid input
        for any fn); with `min_batch` the caller's usual batch size, a short last batch reuses the
        compiled program;
      * puts them on the mesh with an explicit `jax.device_put` (no implicit transfers: it runs
        under `jax.transfer_guard("disallow")`), the batch split over (data, fsdp);
      * returns the outputs for the N real rows, as jax arrays: batch-sharded (`out="batch"`; when
        padding was needed the trimmed result is replicated), or replicated on every device
        (`out="replicated"`: every host can read the whole result).
    xs may be numpy arrays (host) or jax arrays (padded on device). On a mesh spanning several hosts
    every host must pass the same full batch (jax.device_put's rule for global shardings).

    `extra=(a, ...)` are further arguments, `fn(params, *xs, *extra)`, neither padded nor split:
    traced (new values reuse the compiled program: guidance scales, weights that change during
    training). Host values (numpy, Python scalars) are put on the mesh replicated; jax arrays are
    passed as they are (e.g. a trainer's FSDP-sharded weights).

    `compile(*xs, extra=...)` compiles ahead of time for the padded shapes of such a call (to time
    compilation apart from running); later calls with those shapes run that executable.

    mesh: a Mesh from `create_mesh` / `make_mesh`; None = `local_mesh()` (this host's devices).
    Attributes: mesh, params (the replicated copy), num_shards, jitted (for lowering / cost analysis).
    """

    def __init__(self, fn: Callable[..., Any], params: Any, mesh: Mesh | None = None, *, out: str = "batch",
                 min_batch: int = 0):
        if out not in ("batch", "replicated"):
            raise ValueError(f"BatchedFn: out must be 'batch' or 'replicated', got {out!r}")
        self.mesh = local_mesh() if mesh is None else mesh
        names = batch_axes(self.mesh)
        self.num_shards = math.prod(self.mesh.shape[a] for a in names)
        self.min_batch = int(min_batch)
        self._in = NamedSharding(self.mesh, P(names or None))
        self._replicated = replicated(self.mesh)
        self.params = jax.device_put(params, self._replicated)
        self.jitted = jax.jit(traced_on(self.mesh, fn), out_shardings=self._in if out == "batch" else self._replicated)
        self._compiled: dict[tuple, Any] = {}  # padded batch shapes -> ahead-of-time compiled executable

    def padded_size(self, n: int) -> int:
        """The batch size a call with n rows is padded to."""
        return -(-max(n, self.min_batch, 1) // self.num_shards) * self.num_shards

    def _arguments(self, xs: tuple, extra: tuple) -> tuple[int, int, tuple]:
        """(n, pad, the compiled program's arguments) of a call."""
        n = int(xs[0].shape[0])
        if any(int(x.shape[0]) != n for x in xs):
            raise ValueError(f"BatchedFn: batch arguments of different lengths {[x.shape[0] for x in xs]}")
        pad = self.padded_size(n) - n
        if pad:
            xs = tuple(_pad_rows(x, pad) for x in xs)
        extra = jax.tree.map(lambda v: v if isinstance(v, jax.Array) else jax.device_put(v, self._replicated),
                             tuple(extra))
        return n, pad, (self.params, *(jax.device_put(x, self._in) for x in xs), *extra)

    @staticmethod
    def _shapes(args: tuple) -> tuple:
        return (jax.tree.structure(args[1:]),) + tuple((a.shape, a.dtype) for a in jax.tree.leaves(args[1:]))

    def compile(self, *xs: Any, extra: tuple = ()) -> Any:
        """Compiles (ahead of time) the program of a call with these arguments; returns the executable."""
        _, _, args = self._arguments(xs, extra)
        key = self._shapes(args)
        if key not in self._compiled:
            self._compiled[key] = self.jitted.lower(*args).compile()
        return self._compiled[key]

    def __call__(self, *xs: Any, extra: tuple = ()) -> Any:
        n, pad, args = self._arguments(xs, extra)
        out = self._compiled.get(self._shapes(args), self.jitted)(*args) if self._compiled else self.jitted(*args)
        if not pad:
            return out
        # N rows do not split evenly over the shards: the trimmed result is replicated (explicit, so
        # it also holds on meshes with explicit axis types, where slicing a sharded axis is an error).
        return jax.tree.map(lambda v: _head(jax.device_put(v, self._replicated), n), out)


@functools.partial(jax.jit, static_argnums=1)
def _pad_on_device(x: jax.Array, pad: int) -> jax.Array:
    return jax.numpy.concatenate([x, jax.numpy.repeat(x[-1:], pad, axis=0)])


@functools.partial(jax.jit, static_argnums=1)
def _head(x: jax.Array, n: int) -> jax.Array:
    return x[:n]


def _pad_rows(x: Any, pad: int) -> Any:
    """x with its last row repeated `pad` more times (on the device for jax arrays, else in numpy)."""
    if isinstance(x, jax.Array):
        return _pad_on_device(x, pad)
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
