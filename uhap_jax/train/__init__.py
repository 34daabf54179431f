"""uhap_jax.train"""
