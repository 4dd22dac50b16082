"""`python -m lora_causal` and `accelerate launch -m lora_causal` enter here."""

from lora_causal.cli import main

raise SystemExit(main())
