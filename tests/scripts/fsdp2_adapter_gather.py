"""Run under torchrun with 2 CPU processes: shard a tiny LoRA model with FSDP2 (fully_shard, gloo) and check that
gather_adapter_state returns exactly the adapter weights of the unsharded model, and nothing of the base."""

import json
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from lora_causal.training.saving import gather_adapter_state

dist.init_process_group("gloo")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
expected = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert any(type(p).__name__ == "DTensor" for p in model.parameters()), "FSDP2 did not shard"
gathered = gather_adapter_state(model)
ok = gathered is not None and gathered.keys() == expected.keys() and all(
    torch.equal(gathered[name], expected[name]) for name in expected)
if dist.get_rank() == 0:
    json.dump({"ok": ok, "tensors": len(gathered or {}), "base_in_it": any("lora_" not in n for n in gathered or {})},
              open(sys.argv[1], "w"))
dist.destroy_process_group()
