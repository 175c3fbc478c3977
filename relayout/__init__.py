"""relayout: MoE LoRA adapter layouts as data (rules -> compiled plans -> normalized adapters)."""
