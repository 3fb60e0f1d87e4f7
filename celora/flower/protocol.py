"""The messages between celora's ServerApp and ClientApp, defined once: record names, keys and kinds.

query   (server -> every client)   config {kind: hello}       -> metrics {client, examples}
query   (server -> every client)   config {kind: data-stats}  -> stats (ArrayRecord at the wire dtype), metrics
train   (server -> sampled)        shared (ArrayRecord), config {round, last-accepted}
                                                               -> shared (ArrayRecord), metrics {client, loss,
                                                                  examples, tokens}
evaluate (server -> evaluated)     personal (ArrayRecord), config {last-accepted} -> metrics {client, <task sums>}

`last-accepted` is the last round whose upload from that client the server accepted (-1: none),
so the client knows whether to keep the private tensors it trained in its last round.
"""
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"  # a SuperNode's node config (Flower's names)
OVERRIDES = "overrides"  # the run config key `flwr run` apps compose their Hydra config from

CONFIG, METRICS = "celora.config", "celora.metrics"
SHARED, PERSONAL, STATS = "celora.shared", "celora.personal", "celora.stats"
KIND, HELLO, DATA_STATS = "kind", "hello", "data-stats"
ROUND, LAST_ACCEPTED = "round", "last-accepted"
CLIENT, EXAMPLES, LOSS, TOKENS, SIGMA = "client", "examples", "loss", "tokens", "sigma"

# in a client's context.state, never sent
PRIVATE, PENDING, PENDING_ROUND = "celora.private", "celora.pending", "celora.pending-round"
OUT_DIR = "out-dir"  # the run config key naming the ServerApp's run dir (`flwr run`)
