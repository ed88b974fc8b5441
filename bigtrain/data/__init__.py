"""Data: raw sources, tokenizer, prepared token shards (torch-free) and the training loader (torch)."""
