"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (`out_sharding` metadata, e.g. ("embed", "mlp")) and
activations are constrained with names like ("batch", "length", "act_embed"). `RULES` turns a name
into mesh axes; changing the parallelism layout is a config change (`mesh:` sizes, `mesh.rules`),
never an edit of a PartitionSpec in model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters: FSDP shards the model dimension, tensor parallelism the heads / MLP / vocab
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "labels": None,  # a reward model's score head [embed, 1]  # LoRA adapters: A [in..., r] and B [r, out...] shard as their weight's in/out axes
    # activations: the batch over every data-parallel axis, features as the weights they meet
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

_active_rules: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("rules", default=None)


def axes_tuple(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """A rules-table or PartitionSpec entry (None, one mesh axis, or several) as a tuple of mesh axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def merged_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The default table with `mesh.rules` from the config applied on top."""
    rules = dict(RULES)
    for name, axes in (overrides or {}).items():
        if name not in RULES:
            raise JaxalignError(f"mesh.rules: unknown logical axis {name!r}; known: {', '.join(RULES)}")
        for axis in axes_tuple(axes):
            if axis not in MESH_AXES:
                raise JaxalignError(f"mesh.rules.{name}: unknown mesh axis {axis!r}; mesh axes: {MESH_AXES}")
        rules[name] = axes if axes is None or isinstance(axes, str) else tuple(axes)
    return rules


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes per axis in MESH_AXES order; one axis may be -1 for "all remaining devices"."""
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise JaxalignError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise JaxalignError(f"mesh: {num_devices} devices cannot be split by {dict(zip(MESH_AXES, shape))}")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise JaxalignError(
            f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, but {num_devices} are "
            "available; set one axis to -1 to take the rest")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices of all processes (or `devices`), axes ("data", "fsdp", "tensor")."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(sizes, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def abstract_mesh(sizes: Mapping[str, int], num_devices: int) -> AbstractMesh:
    """The mesh of `sizes` over `num_devices` devices that need not exist (for lowering a plan)."""
    shape = resolve_mesh_shape(sizes, num_devices)
    return AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_axis_size(name: str, dim: int | None, mesh: Mesh | AbstractMesh,
                      rules: Mapping[str, Any] | None = None) -> int:
    """How many ways the mesh splits an array axis of logical `name` (and size `dim`, when known)."""
    spec = logical_to_spec((name,), None if dim is None else (dim,), mesh, rules)
    return math.prod(mesh.shape[a] for a in axes_tuple(spec[0]))


def data_parallel_size(mesh: Mesh | AbstractMesh, rules: Mapping[str, Any] | None = None) -> int:
    """How many ways the batch axis is split (the product of the mesh axes "batch" maps to)."""
    return logical_axis_size("batch", None, mesh, rules)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh | Any,
                    rules: Mapping[str, Any] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names`.

    A mesh axis is dropped for a dimension it does not divide (e.g. 2 kv heads on tensor=4) and
    never used twice in one spec: the array is then replicated along it rather than rejected.
    """
    rules = rules if rules is not None else (_active_rules.get() or RULES)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        kept = []
        for axis in axes_tuple(rules.get(name) if name is not None else None):
            size = mesh.shape[axis]
            divides = shape is None or shape[dim] % (math.prod(mesh.shape[a] for a in kept) * size) == 0
            if axis not in used and size > 1 and divides:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                   rules: Mapping[str, Any] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> nnx.State:
    """NamedShardings for a model (or optimizer) state from each Variable's `sharding_names`."""

    def one(variable: nnx.Variable) -> nnx.Variable:
        names = variable.get_metadata("out_sharding", None) or (None,) * variable.get_value().ndim
        return variable.replace(named_sharding(names, variable.get_value().shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array: the batch axis over every data-parallel axis."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh, rules))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | AbstractMesh, rules: Mapping[str, Any] | None = None) -> Iterator[Mesh | AbstractMesh]:
    """Make `mesh` and `rules` current: model code then constrains activations by logical name. An
    AbstractMesh (no devices: `plan`) works too, for tracing and lowering."""
    token = _active_rules.set(rules if rules is not None else RULES)
    try:
        with jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh) else jax.set_mesh(mesh):
            yield mesh
    finally:
        _active_rules.reset(token)


def is_split(name: str) -> bool:
    """Whether the current mesh and rules split the logical axis `name` (of any size) over more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1 and logical_axis_size(name, None, mesh, _active_rules.get()) > 1


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
