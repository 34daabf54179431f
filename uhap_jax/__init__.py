"""UHAP-JAX: audio-driven universal Gaussian head avatars in JAX."""

import importlib.metadata
import importlib.util
import os
from pathlib import Path

__version__ = "0.1.0"

# XLA's CPU backend hands small fusions to YNNPACK. Our CPU programs are many small ones (the rasterizer's projection
# backward: [N, 3, 3] multiply-reduces of ~1 ms each), and with those fusions off the tiny prior's training step took
# 164 ms instead of 311 (2-core machine, docs/benchmarks.md). XLA reads XLA_FLAGS when JAX starts its first client,
# so this must run before any array is made; it does, as every stage imports this package first. A flag XLA does not
# know aborts the process, so it is set only for the jaxlib versions checked to have it; a user's own setting wins.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_JAXLIB_VERSIONS = ("0.10.", "0.11.")


def _xla_cpu_without_ynn_fusions() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags or os.environ.get("UHAP_KEEP_YNN", "") not in ("", "0"):
        return
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    if version.startswith(YNN_JAXLIB_VERSIONS):
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()


_xla_cpu_without_ynn_fusions()


def _own_kernels() -> None:
    """Our rasterizer is the top-level package `kernels`; Hugging Face's `kernels` (a dependency of transformers
    >= 5.25) has the same name and, installed in site-packages, shadows it."""
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if spec is not None and spec.origin and Path(spec.origin).resolve() != ours:
        raise ImportError(f"the package 'kernels' resolves to {spec.origin}, not UHAP-JAX's {ours}: another package "
                          "of that name (Hugging Face's, installed by transformers>=5.25) shadows it; run "
                          "`pip uninstall kernels && pip install 'transformers<5.25'`")  # fmt: skip


_own_kernels()
