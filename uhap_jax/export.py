"""Inference bundles: a trained prior's parameters (optionally bf16), its config and its template, in one folder
that loads on any device count.

    bundle/bundle.json    {"kind": "uhap_prior", "step": N, "dtype": "float32"|"bfloat16", "source": workdir}
    bundle/config.json    the training config (`uhap_jax.config_utils.read_config`)
    bundle/template.npz   the template mesh, UVs, regions and rig data
    bundle/params/        orbax checkpoint of the parameters (a pure dict)
    bundle/albedo_population.npz  the training identities' albedo population, when the workdir has one
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uhap_jax.artifacts import output_dirs
from uhap_jax.config_utils import read_config, save_config
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.population import POPULATION_FILE
from uhap_jax.models.prior import UHAP
from uhap_jax.train import prior_stage
from uhap_jax.train.checkpoint import restore_latest

BUNDLE_FILE = "bundle.json"
DTYPES = ("float32", "bfloat16")


def build_prior(template: template_lib.Template, config: ml_collections.ConfigDict) -> UHAP:
    """A freshly initialised prior of `config` (its parameters are overwritten by a restore)."""
    return UHAP(template, config.model, rngs=nnx.Rngs(config.train.seed))


def _single_device_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])


def restore_prior(
    workdir: str | Path, mesh: jax.sharding.Mesh | None = None
) -> tuple[UHAP, ml_collections.ConfigDict, int]:
    """The prior of the latest checkpoint in `<workdir>`, replicated on `mesh` (default: one device), with its
    config and step. Works whatever mesh or process count the checkpoint was written with."""
    workdir = Path(workdir)
    config = read_config(workdir / "config.json")
    template = template_lib.procedural_head(config.model.template_resolution)
    mesh = mesh or _single_device_mesh()
    model, step = restore_latest(workdir, build_prior(template, config), prior_stage.make_optimizer(config), mesh,
                                 what="prior", expect=str(workdir / "config.json"))  # fmt: skip
    return model, config, step


def export_bundle(workdir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write an inference bundle of the latest checkpoint in `workdir` to `out` (replaced only when complete)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    model, config, step = restore_prior(workdir)
    template = template_lib.procedural_head(config.model.template_resolution)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    out = Path(out)
    with output_dirs.replacing(out, "bundle", inputs=[workdir]) as staging:  # never a workdir, never foreign
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging.absolute() / "params", params)
        save_config(config, staging / "config.json")
        save_template(template, staging / "template.npz")
        if (Path(workdir) / POPULATION_FILE).is_file():
            shutil.copy(Path(workdir) / POPULATION_FILE, staging / POPULATION_FILE)
        manifest = {"kind": "uhap_prior", "step": step, "dtype": dtype, "source": str(Path(workdir).absolute())}
        (staging / BUNDLE_FILE).write_text(json.dumps(manifest, indent=1))
    return out


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
    template = load_template(path / "template.npz")
    model = build_prior(template, config)
    params = nnx.state(model, nnx.Param)
    replicated = NamedSharding(mesh or _single_device_mesh(), PartitionSpec())
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
    arrays = {
        "vertices": template.vertices, "faces": template.faces, "uvs": template.uvs,
        "region_ids": template.region_ids, "region_names": np.array(template.region_names),
        **{f"weight/{k}": v for k, v in template.weights.items()},
        **{f"anchor/{k}": np.asarray(v) for k, v in template.anchors.items()},
        **{f"landmark/{k}": np.asarray(v) for k, v in template.landmarks.items()},
    }  # fmt: skip
    np.savez(path, **arrays)


def load_template(path: Path) -> template_lib.Template:
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
