"""torch modules: quantized Linear layers and LoRA adapters."""

from .linear4bit import Linear4bit
from .linear8bit import Linear8bitLt
from .lora import LoraLinear

__all__ = ["Linear4bit", "Linear8bitLt", "LoraLinear"]
