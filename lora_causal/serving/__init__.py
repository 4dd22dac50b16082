"""After training: adapters found and checked, merged into their base, and the merge measured for fidelity.

Imports `lora_causal.model`, `lora_causal.data` and `lora_causal.core`.
"""
