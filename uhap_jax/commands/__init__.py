"""uhap_jax.commands"""
