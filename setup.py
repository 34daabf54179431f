"""UHAP-JAX: audio-driven universal Gaussian head avatars in JAX."""

from setuptools import find_packages, setup

setup(
    name="uhap-jax",
    version="0.1.0",
    description="Audio-driven universal Gaussian head avatars (UHAP) in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["uhap_jax*", "kernels*", "data_pipelines*", "configs*"]),
    # The CUDA kernels' source, compiled with nvcc at first use on an NVIDIA GPU (kernels/cuda_ops.py).
    package_data={"kernels": ["cuda/*.cu"]},
    install_requires=[
        # JAX 0.10.2 is the newest for Python 3.11 (CPU, CI); the GPU machine runs 0.11.x.
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.30,<0.13",
        "chex>=0.1.90",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "tensorflow-datasets>=4.9.9,<5",
        "importlib_resources>=6",
        "array-record>=0.8",
        # 5.25 depends on Hugging Face's `kernels` package, whose top-level name shadows this project's `kernels`.
        "transformers>=5.0,<5.25",
        "safetensors>=0.5",
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "tqdm>=4.66",
        "pillow>=10",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "espeakng-loader>=0.2.4",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            # CPU build from local disk, only for parity tests against transformers' PyTorch models.
            "torch==2.13.0",
        ],
    },
    entry_points={"console_scripts": ["uhap=uhap_jax.cli:main"]},
)
