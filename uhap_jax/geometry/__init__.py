"""uhap_jax.geometry"""
