"""Data layer: tokenizer, conversation templates and label masks."""
