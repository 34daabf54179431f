"""Synthetic talking-head captures, importers of real capture layouts, TFDS builder and grain loaders; the dataset
as the stages see it (`dataset`: root, records, split, subject tables, sequences) and monocular videos."""
