"""UHAP-JAX: audio-driven universal Gaussian head avatars in JAX."""

__version__ = "0.1.0"
