"""Training: the corpora and batches, the AdamW optimizer, the training loop, the tutorial model."""
