"""uhap_jax.eval"""
