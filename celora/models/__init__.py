"""Backbones and the classifier that puts a task head on them."""
