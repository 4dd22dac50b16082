"""Data layer: rows from files or the Hub, tokenized by format into the prepared-data cache, checked, then batched.

sources -> tokenizing (chat masks) -> shards / cache / prepare -> dataset -> checks; collator, packing and even
split turn examples into batches. Imports only `lora_causal.core`.
"""
