"""Data: reading labelled text, tokenizing it, and batching it for training."""
