"""Privacy of uploads: gradient-inversion attacks, reconstruction scores, client-level differential privacy."""
