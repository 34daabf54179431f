"""uhap_jax.models"""
