"""The differentiable 3D Gaussian rasterizer (gsplat 1.5.3 classic semantics). Imports nothing else of ours."""

from kernels.rasterize import (
    AdaptiveCapacity,
    CapacityOverflowError,
    RasterStats,
    Rendered,
    capacity_for,
    rasterize,
)

__all__ = [
    "AdaptiveCapacity",
    "CapacityOverflowError",
    "RasterStats",
    "Rendered",
    "capacity_for",
    "rasterize",
]
