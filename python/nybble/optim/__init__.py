"""Optimizers for QLoRA: AdamW with 32-bit or 8-bit block-wise states, paged or not.

- :class:`AdamW` (``optim_bits=32|8``, ``paged=``), :class:`AdamW8bit`,
  :class:`PagedAdamW`, :class:`PagedAdamW8bit`: ``torch.optim.Optimizer`` subclasses with
  ``state_dict`` / ``load_state_dict``.
- :mod:`nybble.optim.paged`: CUDA managed-memory buffers and prefetch.
"""

from .adamw import STATE_BLOCKSIZE, AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["STATE_BLOCKSIZE", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]
