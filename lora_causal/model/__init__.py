"""Model layer: a model's config and skeleton, 4-bit loading with LoRA, attention backends and the batching plan.

Also synthetic models (random weights from a config) and greedy answers. Imports only `lora_causal.core`.
"""
