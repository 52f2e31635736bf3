"""Training: the corpora and batches, the user's own data files (text and chat, with loss masks), the AdamW
optimizer, the training loop, fine-tuning, the tutorial model."""
