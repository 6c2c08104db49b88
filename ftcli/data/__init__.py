"""Data: sources (files, the Hub) -> labels -> tokenized, cached splits (prepare) -> batches."""
