"""lora_causal: QLoRA fine-tuning of Hugging Face causal LMs from strict YAML recipes."""

__version__ = "0.1.0"
