"""Inference bundles: a trained prior's parameters (optionally bf16), its config and its template, in one folder
that loads on any device count.

    bundle/bundle.json    {"kind": "uhap_prior", "step": N, "dtype": "float32"|"bfloat16", "source": workdir}
    bundle/config.json    the training config (`uhap_jax.config_utils.read_config`)
    bundle/template.npz   the template mesh, UVs, regions and rig data
    bundle/params/        orbax checkpoint of the parameters (a pure dict)
    bundle/albedo_population.npz  the training identities' albedo population, when the workdir has one

`uhap_jax.artifacts.priors.export_bundle` writes one from a training workdir.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uhap_jax.artifacts.checkpoints import single_device_mesh
from uhap_jax.config_utils import read_config, save_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import UHAP, build_prior

BUNDLE_FILE = "bundle.json"
DTYPES = ("float32", "bfloat16")


def save_bundle(params: dict, config: ml_collections.ConfigDict, template: template_lib.Template, out: Path,
                manifest: dict) -> None:  # fmt: skip
    """A bundle in the folder `out` (created if missing) of these parameters (a pure dict), their config and
    template, and `manifest`."""
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.absolute() / "params", params)
    save_config(config, out / "config.json")
    save_template(template, out / "template.npz")
    (out / BUNDLE_FILE).write_text(json.dumps(manifest, indent=1))


def load_bundle(path: str | Path, mesh: jax.sharding.Mesh | None = None) -> tuple[UHAP, ml_collections.ConfigDict]:
    """A bundle's prior, replicated on `mesh` (default: one device); bf16 parameters come back as float32."""
    path = Path(path)
    manifest_file = path / BUNDLE_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file}: not an inference bundle (made by `uhap export`)")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("kind") != "uhap_prior":
        raise ValueError(f"{manifest_file}: kind {manifest.get('kind')!r} is not 'uhap_prior'")
    config = read_config(path / "config.json")
    model = build_prior(load_template(path / "template.npz"), config)
    params = nnx.state(model, nnx.Param)
    replicated = NamedSharding(mesh or single_device_mesh(), PartitionSpec())
    stored = jnp.bfloat16 if manifest["dtype"] == "bfloat16" else None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, stored if stored and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=replicated
        ),
        nnx.to_pure_dict(params),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            values = checkpointer.restore(path.absolute() / "params", abstract)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path / 'params'}: does not match {path / 'config.json'}: {error}") from error
    values = jax.tree.map(lambda v, ref: v.astype(ref.dtype), values, nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, values)
    nnx.update(model, params)
    return model, config


def save_template(template: template_lib.Template, path: Path) -> None:
    """The template mesh, UVs, regions and rig data as one npz (`load_template` reads it back)."""
    arrays = {
        "vertices": template.vertices, "faces": template.faces, "uvs": template.uvs,
        "region_ids": template.region_ids, "region_names": np.array(template.region_names),
        **{f"weight/{k}": v for k, v in template.weights.items()},
        **{f"anchor/{k}": np.asarray(v) for k, v in template.anchors.items()},
        **{f"landmark/{k}": np.asarray(v) for k, v in template.landmarks.items()},
    }  # fmt: skip
    np.savez(path, **arrays)


def load_template(path: Path) -> template_lib.Template:
    """The template that `save_template` wrote."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundle has no template")
    with np.load(path) as data:

        def group(prefix):
            return {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(prefix + "/")}

        return template_lib.Template(
            vertices=data["vertices"], faces=data["faces"], uvs=data["uvs"], region_ids=data["region_ids"],
            region_names=tuple(str(n) for n in data["region_names"]), weights=group("weight"),
            anchors=group("anchor"), landmarks={k: int(v) for k, v in group("landmark").items()},
        )  # fmt: skip
