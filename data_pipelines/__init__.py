"""Synthetic talking-head captures, importers of real capture layouts, TFDS builder and grain loaders."""
