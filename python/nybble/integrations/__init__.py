"""nybble inside the Hugging Face stack.

* :mod:`nybble.integrations.transformers`: :class:`NybbleConfig`, a transformers quantization
  config (and its ``HfQuantizer``) registered through transformers' public hooks, so
  ``AutoModel*.from_pretrained(path, quantization_config=NybbleConfig(...))`` builds nybble
  layers from a dense checkpoint (quantizing each weight as it loads) or from a packed one
  (nybble's or transformers + bitsandbytes'), and ``save_pretrained`` writes the
  bitsandbytes layout.
* :mod:`nybble.integrations.peft`: PEFT's LoRA layers over nybble's layers (PEFT's custom
  module registration), running nybble's fused QLoRA path.

Nothing here is imported by ``import nybble``; ``nybble.NybbleConfig`` imports the
transformers integration on first use.
"""
