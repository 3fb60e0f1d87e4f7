"""Datasets (load, clean, tokenise) and their federated partitions."""
