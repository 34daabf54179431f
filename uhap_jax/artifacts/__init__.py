"""Artifacts on disk: training checkpoints and params-only restore, inference bundles, avatar folders, safe output
folders."""
