"""Every random draw of a run comes from its one seed: an independent seed per (purpose, round, client)."""
from __future__ import annotations

import numpy as np

# Purposes: the first part after the run's seed, so no two kinds of draw ever share a stream.
SAMPLING = 1  # which clients take part in each round (one generator for the run: np.random.default_rng([seed, 1]))
FROZEN_FACTORS = 2  # the 64-bit seed the server sends once; every client rebuilds the frozen factors from it
DROPOUT = 3  # the global generator before a cohort trains (round, first client of the cohort)
BATCHES = 4  # each client's batch order (round, client)
STATS_SUBSAMPLE = 5  # the examples a client summarises for data-space similarity (client)
STATS_NOISE = 6  # the DP noise on those summaries (client)
UPLOAD_NOISE = 9  # the DP noise on a round's uploads (round)
EVAL_CLIENTS = 10  # which clients personal evaluation scores when fl.eval_clients < all (once a run)
VALIDATION = 11  # each client's validation rows, carved out of its local train (client.val_fraction; client)
LORA_SB_BATCH = 12  # the one batch each client computes Fed-SB's round-0 gradient on (client)
PARTITION_REDRAW = 13  # the seeds a Dirichlet partition is drawn from after the run's own (attempt)
FEATURE_NOISE = 14  # a feature_noise client's Gaussian noise on its images (client, then row)


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed for the given parts, e.g. derive_seed(seed, BATCHES, round, client)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
