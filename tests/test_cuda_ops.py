"""The CUDA backend's build and selection on a machine without a GPU (its kernels are checked on a GPU by
`python -m kernels.check --backend cuda`; see docs/benchmarks.md)."""

import ctypes
import os

import jax
import pytest

from kernels import cuda_ops
from kernels.rasterize import _resolve_backend

needs_nvcc = pytest.mark.skipif(cuda_ops.nvcc_path() is None, reason="nvcc (CUDA toolkit) not installed")


@needs_nvcc
def test_kernels_compile_for_hopper_and_are_cached(tmp_path):
    library = cuda_ops.build(arch="sm_90", cache_dir=tmp_path)
    loaded = ctypes.cdll.LoadLibrary(str(library))  # needs no GPU: the CUDA runtime is linked statically
    for symbol in cuda_ops.TARGETS.values():
        assert getattr(loaded, symbol)
    stamp = os.stat(library).st_mtime_ns
    assert cuda_ops.build(arch="sm_90", cache_dir=tmp_path) == library
    assert os.stat(library).st_mtime_ns == stamp  # the cached build, not a second compile
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial files left behind


@needs_nvcc
def test_compiler_errors_name_the_source(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cu"
    broken.write_text(cuda_ops.SOURCE.read_text() + "\nthis is not C++;\n")
    monkeypatch.setattr(cuda_ops, "SOURCE", broken)
    with pytest.raises(cuda_ops.CudaBuildError, match="nvcc failed on .*broken.cu"):
        cuda_ops.build(arch="sm_90", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_ops, "nvcc_path", lambda: None)
    with pytest.raises(cuda_ops.CudaBuildError, match="nvcc not found"):
        cuda_ops.build(arch="sm_90", cache_dir=tmp_path)
    assert not cuda_ops.available()


def test_backend_selection(monkeypatch):
    assert jax.default_backend() == "cpu"
    monkeypatch.delenv("UHAP_RASTER_BACKEND", raising=False)
    assert _resolve_backend("auto") in ("cpu", "reference")  # the C++ kernels where a compiler builds them
    monkeypatch.setenv("UHAP_RASTER_BACKEND", "pallas")
    assert _resolve_backend("auto") == "pallas"
    assert _resolve_backend("reference") == "reference"  # an explicit backend wins over the variable
    monkeypatch.setenv("UHAP_RASTER_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs an NVIDIA GPU"):
        _resolve_backend("auto")
    monkeypatch.setenv("UHAP_RASTER_BACKEND", "opengl")
    with pytest.raises(ValueError, match="UHAP_RASTER_BACKEND must be one of"):
        _resolve_backend("auto")
