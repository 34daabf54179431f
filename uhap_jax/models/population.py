"""The training identities' albedo as a population: per-Gaussian mean and principal components.

Personalisation reads a new person's albedo off a monocular video. A video shows some texels well, some poorly
(blurred, at grazing angles) and some never (the mouth interior, teeth, eyeballs, the far side of the head).
The population fills all of them in one estimate: the maximum-a-posteriori coefficients of its components
given the texels the video shows, each weighted by how often it was seen. Features that every identity shares
(teeth, eyeballs) come from the mean; those that vary together (brows with the hair, lips with the skin) come
from the components that the seen texels pin down.

It also holds the average identity's geometry: the training identities' mean registered-scan offset from the
template. Personalisation without a scan starts there rather than at the bare template, which no training scan
resembles (registrations differ from it systematically: the scalp, unseen by scanners, follows the nearest fitted
skin, 46 mm off the template on the demo's data), so the IdentityEncoder decodes it as it was trained to: the
held-out identities' LVE fell 12% (docs/benchmarks.md, session 14).

The prior stage writes one beside its checkpoints (`POPULATION_FILE`, from its training identities' neutral
scans) and `export_bundle` copies it into the bundle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

POPULATION_FILE = "albedo_population.npz"


@dataclasses.dataclass(frozen=True)
class AlbedoPopulation:
    mean: np.ndarray  # [N, 3] per-Gaussian albedo of the average identity
    components: np.ndarray  # [K, N, 3] principal directions, each scaled by its standard deviation
    # [N, 3] metres: the average identity's scan offset from the template per Gaussian (None: files from before it)
    mean_offset: np.ndarray | None = None

    @classmethod
    def fit(cls, albedos: np.ndarray, max_components: int = 16, offsets: np.ndarray | None = None
            ) -> AlbedoPopulation:  # fmt: skip
        """From the training identities' per-Gaussian albedo [S, N, 3]: the mean and up to S - 1 components; with
        their scan offsets [S, N, 3] (metres), the mean offset too."""
        albedos = np.asarray(albedos, np.float64)
        if albedos.ndim != 3 or albedos.shape[-1] != 3 or len(albedos) < 1:
            raise ValueError(f"albedo population: expected [identities, gaussians, 3] albedos, got {albedos.shape}")
        if offsets is not None and np.shape(offsets) != albedos.shape:
            raise ValueError(f"albedo population: offsets {np.shape(offsets)} do not match albedos {albedos.shape}")
        mean_offset = None if offsets is None else np.asarray(offsets, np.float64).mean(0).astype(np.float32)
        count = len(albedos)
        mean = albedos.mean(0)
        _, singular, directions = np.linalg.svd((albedos - mean).reshape(count, -1), full_matrices=False)
        keep = min(max_components, count - 1, int(np.sum(singular > 1e-6 * max(singular.max(initial=0.0), 1e-12))))
        components = directions[:keep] * (singular[:keep, None] / np.sqrt(max(count - 1, 1)))
        return cls(mean.astype(np.float32), components.reshape(keep, *mean.shape).astype(np.float32), mean_offset)

    def save(self, path: str | Path) -> None:
        extra = {} if self.mean_offset is None else {"mean_offset": self.mean_offset}
        np.savez(path, mean=self.mean, components=self.components, **extra)

    @classmethod
    def load(cls, path: str | Path) -> AlbedoPopulation:
        with np.load(path) as data:
            missing = {"mean", "components"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not an albedo population (missing {sorted(missing)})")
            mean, components = data["mean"], data["components"]
            mean_offset = data["mean_offset"] if "mean_offset" in data.files else None
        if mean.ndim != 2 or components.shape[1:] != mean.shape:
            raise ValueError(f"{path}: mean {mean.shape} and components {components.shape} do not match")
        if mean_offset is not None and mean_offset.shape != mean.shape:
            raise ValueError(f"{path}: mean_offset {mean_offset.shape} does not match mean {mean.shape}")
        return cls(mean, components, mean_offset)

    def posterior(self, observed: np.ndarray, weights: np.ndarray, noise: float, regions: np.ndarray | None = None,
                  region_variance: float = 0.0) -> np.ndarray:  # fmt: skip
        """The MAP albedo [N, 3] given `observed` colours [N, 3] with `weights` [N] (0 = unseen).

        Coefficients have a unit Gaussian prior; each seen texel's colour has Gaussian noise of variance
        `noise / weight`. With `regions` [N] (ids), each region also has a colour offset, of prior variance
        `region_variance` times the population's own variance in that region: what the population does not span
        (a hair colour no training identity had) is then taken from the region's seen texels, also for its
        unseen ones, while what every identity shares (teeth, eyeballs) stays put."""
        if observed.shape != self.mean.shape or weights.shape != self.mean.shape[:1]:
            raise ValueError(f"albedo population of {self.mean.shape}: got colours {observed.shape}, "
                             f"weights {weights.shape}")  # fmt: skip
        basis = self.components.reshape(len(self.components), -1).astype(np.float64)  # [K, N*3]
        if regions is not None and region_variance > 0:
            ids = np.unique(regions)
            member = (regions[None, :] == ids[:, None]).astype(np.float64)  # [G, N]
            offsets = member[:, None, :, None] * np.eye(3)[None, :, None, :]  # [G, channel, N, channel]
            spread = np.array([np.mean(self.components[:, regions == i] ** 2) * len(self.components) for i in ids])
            offsets = offsets * np.sqrt(region_variance * spread)[:, None, None, None]
            offsets = offsets.reshape(len(ids) * 3, -1)
            basis = np.concatenate([basis, offsets])
        w = np.repeat(np.asarray(weights, np.float64), 3) / noise
        residual = (np.asarray(observed, np.float64) - self.mean).reshape(-1)
        normal = (basis * w) @ basis.T + np.eye(len(basis))
        coefficients = np.linalg.solve(normal, (basis * w) @ residual)
        return (self.mean + (coefficients @ basis).reshape(self.mean.shape)).astype(np.float32)
