"""runtime: Triton MoE multi-LoRA forward over normalized adapters."""
from .errors import (AdapterError, DeviceError, DtypeError, MoeLoraError, NormalizedFormatError,
                     ShapeError, SlotError)
from .normalized import load_normalized_layer
from .ops import moe_lora_forward
from .reference import moe_reference, moe_reference_vectorized
from .slots import LoraSlots

__all__ = ["moe_lora_forward", "LoraSlots", "load_normalized_layer", "moe_reference",
           "moe_reference_vectorized", "MoeLoraError", "ShapeError", "DtypeError", "DeviceError",
           "AdapterError", "SlotError", "NormalizedFormatError"]
