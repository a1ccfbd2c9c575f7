"""A mesh and the axes a quantity is split over (sequences, particles)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import numpy as np

__all__ = ["MeshAxes", "mesh_axes"]


class MeshAxes(NamedTuple):
    """A mesh and the names of the axes a quantity is split over (a subset of them)."""

    mesh: jax.sharding.Mesh
    axes: tuple

    @property
    def size(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.axes]))


def mesh_axes(mesh, axes=None) -> Optional[MeshAxes]:
    """``mesh`` with the axes to split over: ``axes`` (a name or a tuple of names), or
    all of them; None without a mesh."""
    if mesh is None:
        return None
    if axes is None:
        axes = tuple(mesh.axis_names)
    elif isinstance(axes, str):
        axes = (axes,)
    else:
        axes = tuple(axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or not axes:
        raise ValueError(f"axes {axes!r} must be names of the mesh's axes {mesh.axis_names}")
    return MeshAxes(mesh, axes)
