"""Federated simulation: the wire, aggregators, local training, the round loop, evaluation."""
