"""`uhap bench train --real-data ROOT`: is the accelerator fed? One run times, on the same model and data:

- the step alone: the train step on one real batch kept on the device (no input pipeline at all);
- the loader alone: the host input pipeline (grain, this machine's cores) producing numpy batches;
- end to end: the train loop as `uhap train prior` runs it (loader, device prefetch, per-example gather,
  step, the pair-capacity read-back of the step before), without evaluations and checkpoints;

in images/s (frames x rendered views), and end to end over the step alone. `batch_search` reports the peak
device memory of the step and the largest batch that fits, from compiled memory analyses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np

from data_pipelines import dataset as dataset_lib
from data_pipelines import loaders
from uhap_jax.geometry import template as template_lib
from uhap_jax.models.prior import build_prior
from uhap_jax.models.render import initial_capacity
from uhap_jax.train import prior_bench, prior_stage
from uhap_jax.train.loop import Trainer
from uhap_jax.train.mesh import batch_sharding, make_mesh
from uhap_jax.train.optimizer import make_optimizer

logger = logging.getLogger(__name__)


def _loader(config, records, split, sharding, *, device_prefetch: int) -> loaders.GlobalBatchIterator:
    options = dataset_lib.loader_options(config, device_prefetch=device_prefetch)
    return loaders.multiview_loader(dataset_lib.train_frames(records, split), sharding, options,
                                    num_views=config.data.num_views, serials=split.held_in_cameras,
                                    encoder_views=dataset_lib.encoder_views(config))  # fmt: skip


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def benchmark_real_data(config: ml_collections.ConfigDict, root: str | Path, workdir: Path, *, steps: int = 100,
                        warmup: int = 10, loader_batches: int = 50) -> dict[str, float]:  # fmt: skip
    """The three figures above on the layout at `root` (prepared and, with data.decoded, decoded once first)."""
    config = config.copy_and_resolve_references()
    config.data.root = str(root)
    mesh = make_mesh(config.train.mesh.data, config.train.mesh.fsdp)
    started = time.perf_counter()
    root = dataset_lib.dataset_root(config)
    records = dataset_lib.prepared_records(root, config)
    prepare_s = time.perf_counter() - started
    split = dataset_lib.read_split(root, records, config.data.num_views)
    template = template_lib.procedural_head(config.model.template_resolution)
    model = build_prior(template, config)
    tables = dataset_lib.subject_tables(root, records, model.layout, template, config)
    views = config.data.num_views
    images_per_batch = config.data.batch_size * views

    host = _loader(config, records, split, None, device_prefetch=0)
    for _ in range(3):
        next(host)  # thread pool and page cache warm
    started = time.perf_counter()
    for _ in range(loader_batches):
        next(host)
    loader_s = (time.perf_counter() - started) / loader_batches

    frames = _loader(config, records, split, batch_sharding(mesh),
                     device_prefetch=config.data.get("device_prefetch", 0))  # fmt: skip
    data = prior_stage.PriorBatches(frames, tables, mesh)
    probe = jax.device_get(next(data))
    capacity = initial_capacity(model, probe, config.render.capacity_headroom, config.render.capacity_shrink_after)
    trainer = Trainer(config.train, model, make_optimizer(config),
                      prior_stage.make_loss_fn(config, capacity), data, workdir, mesh=mesh,
                      capacity=capacity)  # fmt: skip

    def loop(count: int, batches=None) -> float:
        """`count` steps as Trainer.run takes them (one step in flight; the previous one's pairs read back)."""
        previous = None
        started = time.perf_counter()
        for _ in range(count):
            metrics = trainer.train_step(next(data) if batches is None else batches)
            if previous is not None:
                trainer._adapt_capacity(previous)
            previous = metrics
        jax.block_until_ready(previous)
        return (time.perf_counter() - started) / count

    def settled(count: int, batches=None) -> float:
        """A timed loop during which the pair capacity did not grow (a growth recompiles: timed again)."""
        for _ in range(3):
            before = capacity.value
            seconds = loop(count, batches)
            if capacity.value == before:
                return seconds
            loop(3, batches)  # the step that grew it ran in the loop; the recompiled one compiles here
        raise RuntimeError(f"the pair capacity kept growing ({capacity.value}); time with more warm-up steps")

    started = time.perf_counter()
    loop(warmup)  # compiles, and grows the pair capacity to what the data needs
    resident = next(data)
    loop(3, resident)
    compile_s = time.perf_counter() - started
    step_s = settled(steps, resident)
    end_to_end_s = settled(steps)
    step_again_s = settled(steps, resident)  # the step alone once more: its spread bounds the ratio's noise
    metrics = jax.device_get(trainer.train_step(next(data)))
    frames.close()
    trainer.close()
    peak = _peak_bytes()
    return {
        "device": f"{jax.devices()[0].device_kind} x {jax.device_count()}",
        "batch": f"{config.data.batch_size}x{views}",
        "image_size": int(probe["images"].shape[2]),
        "prepare_s": prepare_s,
        "warmup_s": compile_s,
        "pair_capacity": capacity.value,
        "step_ms": 1e3 * step_s,
        "step_again_ms": 1e3 * step_again_s,
        "step_images_per_s": images_per_batch / step_s,
        "end_to_end_ms": 1e3 * end_to_end_s,
        "end_to_end_images_per_s": images_per_batch / end_to_end_s,
        "loader_images_per_s": images_per_batch / loader_s,
        "ratio": min(step_s, step_again_s) / end_to_end_s,
        "peak_gib": peak / 2**30 if peak else float("nan"),
        "train_psnr": float(metrics["psnr"]),
    }


def batch_search(config: ml_collections.ConfigDict, workdir: Path, sizes: list[int]) -> Iterator[dict]:
    """For each global batch size (frames), the compiled step's device memory (arguments + outputs + temporaries,
    from XLA's memory analysis of the real train step) against the device's limit, yielded as soon as it is known
    (each size compiles the step: a call cut short keeps the sizes it reached). The largest that fits is then run
    once to confirm it, and a last row extrapolates the first two sizes' slope to the largest batch that fits."""
    fits, measured = None, []
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    for size in sizes:
        sized = config.copy_and_resolve_references()
        sized.data.batch_size = size
        rng = np.random.default_rng(sized.train.seed)
        template = template_lib.procedural_head(sized.model.template_resolution)
        model = build_prior(template, sized)
        batch = prior_bench.synthetic_batch(sized, model, template, rng)
        capacity = initial_capacity(model, batch, sized.render.capacity_headroom)
        trainer = Trainer(sized.train, model, make_optimizer(sized),
                          prior_stage.make_loss_fn(sized, capacity), iter(loaders.grain.MapDataset.range(1)
                                                                          .to_iter_dataset()), workdir)  # fmt: skip
        with jax.set_mesh(trainer.mesh):
            placed = jax.device_put(batch, batch_sharding(trainer.mesh))
            compiled = trainer._step_fn.lower(trainer.state, placed).compile()
        analysis = compiled.memory_analysis()
        total = None
        if analysis is not None:
            total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                     + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)  # fmt: skip
            measured.append((size, total / 2**30))
        fitted = total is not None and limit is not None and total < limit
        if fitted:
            if fits is not None:
                fits[1].close()
            fits = (size, trainer, compiled, placed)
        else:
            trainer.close()
        yield {"batch": f"{size}x{sized.data.num_views}", "step_gib": total / 2**30 if total else float("nan"),
               "limit_gib": limit / 2**30 if limit else float("nan"), "fits": fitted}  # fmt: skip
        if total is not None and limit is not None and total >= limit:
            break
    if fits is not None:
        size, trainer, compiled, placed = fits
        try:
            with jax.set_mesh(trainer.mesh):
                jax.block_until_ready(compiled(trainer.state, placed))
            ran = "yes"
        except Exception as error:  # an allocation the analysis did not foresee: say so, keep the table
            ran = f"failed: {str(error).splitlines()[0][:80]}"
        trainer.close()
        yield {"batch": f"{size}x{config.data.num_views}", "largest_that_fits_ran": ran}
    if len(measured) >= 2 and limit:
        (b0, g0), (b1, g1) = measured[:2]
        per_frame = (g1 - g0) / (b1 - b0)
        largest = int((limit / 2**30 - (g0 - per_frame * b0)) / per_frame)
        yield {"gib_per_frame": per_frame, "predicted_max_batch": largest}
