"""Masks under meshes: explicit mesh axes, ``jax.shard_map`` and resharding a mask like its params.

With a classic ``Mesh`` the mask code needs nothing from here. With ``jax.make_mesh`` /
``jax.set_mesh`` (explicit axis types) shardings are part of the types: :func:`run_sharded` runs
the selection under automatic sharding and :func:`reshard_like` gives a mask leaf its parameter's
sharding. Inside ``jax.shard_map`` a mask computed from per-shard values would differ per shard:
:func:`check_not_varying` refuses it. Re-exported by :mod:`prunejax.masks.core`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from prunejax.errors import ConfigError


def _sharding(x: Any) -> Any:
  try:
    return getattr(jax.typeof(x), "sharding", None)
  except TypeError:
    return None


def _explicit_axes(sharding: Any) -> tuple[str, ...]:
  mesh = getattr(sharding, "mesh", None)
  if not isinstance(sharding, NamedSharding) or mesh is None or mesh.empty:
    return ()
  return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def explicit_sharding(x: Any) -> NamedSharding | None:
  """The sharding of ``x`` when it is typed with explicit mesh axes, else None."""
  s = _sharding(x)
  return s if _explicit_axes(s) else None


def has_explicit_axes(leaves: Sequence[Any]) -> bool:
  """Whether any leaf is typed with explicit mesh axes (``jax.make_mesh`` + ``jax.set_mesh``)."""
  return any(_explicit_axes(_sharding(l)) for l in leaves)


def varying_axes(leaves: Sequence[Any]) -> frozenset[str]:
  """The manual mesh axes (inside ``jax.shard_map``) over which some leaf takes different values."""
  axes: set[str] = set()
  for leaf in leaves:
    try:
      aval = jax.typeof(leaf)
    except TypeError:
      continue
    vma = getattr(aval, "vma", None)
    if vma is None:
      vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    axes.update(vma or ())
  return frozenset(axes)


def check_not_varying(leaves: Sequence[Any], what: str) -> None:
  """Raises when a mask would be computed from per-shard values inside ``jax.shard_map``."""
  axes = varying_axes(leaves)
  if axes:
    raise ConfigError(
        f"{what}: inside jax.shard_map the params or scores vary over mesh axes {sorted(axes)}, "
        "so each shard would get a different mask; compute the mask outside shard_map (under "
        "jax.jit on the sharded params) or make them replicated first (jax.lax.pmean / all_gather)")


def run_sharded(fn: Callable[..., Any], args: tuple, like: Sequence[Any]) -> Any:
  """``fn(*args)``, and under explicit mesh axes the same computation with automatic sharding.

  With ``jax.make_mesh`` / ``jax.set_mesh`` (explicit axis types) sorts, scatters and reshapes of
  sharded operands need their output shardings spelled out; the selection code is written for
  automatic sharding, so it runs under ``jax.sharding.auto_axes`` (the compiler shards it as with a
  classic ``Mesh``) and output leaf ``i`` comes back sharded like ``like[i]``. Without explicit
  axes this is ``fn(*args)``.
  """
  leaves = jax.tree.leaves(args) + list(like)
  if not has_explicit_axes(leaves):
    return fn(*args)
  out_sharding = []
  for leaf in like:
    s = _sharding(leaf)
    if not _explicit_axes(s):  # an unsharded leaf: replicated over the mesh of the others.
      mesh = next(_sharding(l).mesh for l in leaves if _explicit_axes(_sharding(l)))
      s = NamedSharding(mesh, PartitionSpec())
    out_sharding.append(s)
  return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(*args)


def reshard_like(m: jax.Array, p: jax.Array) -> jax.Array:
  """Mask leaf ``m`` resharded like ``p`` where explicit mesh axes make their shardings types."""
  sm, sp = _sharding(m), _sharding(p)
  if (_explicit_axes(sm) or _explicit_axes(sp)) and sm != sp and sp is not None:
    return jax.sharding.reshard(m, sp)
  return m
