"""runtime: Triton MoE multi-LoRA forward over normalized adapters."""
