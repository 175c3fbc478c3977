"""relayout: MoE LoRA adapter layouts as data (rules -> compiled plans -> normalized adapters)."""
from relayout.commands import describe
from relayout.compiler import Plan, compile_inverse, compile_plan
from relayout.convert import convert, iter_normalized, load_adapter
from relayout.errors import RelayoutError
from relayout.execute import forward, inverse
from relayout.ruleset import load_rules

__all__ = ["RelayoutError", "load_rules", "compile_plan", "compile_inverse", "forward", "inverse", "Plan",
           "load_adapter", "convert", "describe", "iter_normalized"]
