"""celora: communication-efficient, personalised federated fine-tuning (CE-LoRA) and its baselines."""
__version__ = "0.1.0"
