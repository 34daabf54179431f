"""How far `data_pipelines.scanner.register` puts the template's vertices from a synthetic identity's true ones.

    python scripts/registration_error.py [IDENTITIES]

For IDENTITIES (default 8) tiny-preset identities (seeded, fixed), each scanned once: the RMS and largest distance
(mm) of the lips' vertices from the identity's true rest mesh, for the template itself (no registration), the
registration on geometry alone (`lip_colour=False`) and with the lips matched to the scan's lip colour; the face's
RMS beside. Prints a markdown table.
"""

from __future__ import annotations

import sys

import numpy as np

from data_pipelines import scanner, synth, voices
from uhap_jax.geometry import template as template_lib


def main(count: int = 8) -> None:
    config = synth.synth_config("tiny")
    template = template_lib.procedural_head(config.template_resolution)
    sampler = synth.SurfaceSampler.build(template, config.gaussian_uv_resolution)
    lips, face = template.region_mask("lips"), template.region_mask("face")
    print("| identity | template: lips RMS / max (mm) | geometry only: lips RMS / max "
          "| with lip colour: lips RMS / max | face RMS (geometry only / with lip colour) |")  # fmt: skip
    print("|---|---|---|---|---|")
    rows = []
    for index in range(count):
        voice = voices.draw_voice(np.random.default_rng(index))
        identity = synth.make_identity(template, index, np.random.default_rng(1000 + index), sampler,
                                       synth.counts(config), voice)  # fmt: skip
        raw = synth.scan_identity(template, identity, sampler, config.scan_resolution, np.random.default_rng(index))
        truth = identity.template.vertices
        fits = [
            template.vertices,
            scanner.register(template, raw, lip_colour=False)[0],
            scanner.register(template, raw)[0],
        ]
        errors = [1e3 * np.linalg.norm(v - truth, axis=-1) for v in fits]
        row = [f(e[lips]) for e in errors for f in (lambda x: np.sqrt(np.mean(x**2)), np.max)]
        row += [np.sqrt(np.mean(e[face] ** 2)) for e in errors[1:]]
        rows.append(row)
        print(f"| {index} | {row[0]:.2f} / {row[1]:.2f} | {row[2]:.2f} / {row[3]:.2f} | {row[4]:.2f} / {row[5]:.2f} "
              f"| {row[6]:.2f} / {row[7]:.2f} |")  # fmt: skip
    m = np.mean(rows, 0)
    print(f"| mean | {m[0]:.2f} / {m[1]:.2f} | {m[2]:.2f} / {m[3]:.2f} | **{m[4]:.2f}** / {m[5]:.2f} "
          f"| {m[6]:.2f} / {m[7]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
