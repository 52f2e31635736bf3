"""Training on the user's own data: reading text and chat files into token ids with loss masks, batches, sampling."""
