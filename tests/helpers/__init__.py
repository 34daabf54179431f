"""Helpers that several test modules share: small models and cameras, tiny capture layouts, processes."""
