"""nybble's exception classes: errors as data.

The Rust core's errors reach Python as these classes (or as built-in ones: ``ValueError``,
``OverflowError``, ``OSError`` and its subclasses) with the failure's fields set as
attributes, so callers read ``e.index`` or ``e.path`` instead of parsing messages.

The classes are defined here in Python rather than in the extension so that Python code
raising them (the optimizers, the CUDA paths) and the Rust bindings build the same objects,
with the same documented attributes and defaults; ``nybble._core`` imports and re-exports
them, so ``nybble.NonFiniteError is nybble._core.NonFiniteError``.

Attributes every core error may carry (``None`` or absent when they do not apply):

- ``path`` (``pathlib.Path``): the file involved; ``tensor`` (``str``): the tensor in it.
- Variant fields, named as in ``nybble_core::Error``: e.g. ``blocksize``, ``expected`` /
  ``got``, ``what``, ``dtype``, ``reason``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CorruptFileError", "InternalError", "NonFiniteError"]


class NonFiniteError(ValueError):
    """An input holds NaN or Inf.

    Attributes (``None`` where unknown):

    - ``index``: flat (row-major) index of the first non-finite element.
    - ``value``: that element (``nan``, ``inf`` or ``-inf``).
    - ``position``: ``index`` as a multi-dimensional index of the input's shape (set by
      :func:`nybble.quantize_4bit` and friends, which know the shape).
    - ``tensor`` / ``path``: the checkpoint tensor and file, when converting a checkpoint.
    """

    index: int | None = None
    value: float | None = None
    position: tuple[int, ...] | None = None
    tensor: str | None = None
    path: Path | None = None

    def __init__(
        self,
        *args: object,
        index: int | None = None,
        value: float | None = None,
        position: tuple[int, ...] | None = None,
        tensor: str | None = None,
        path: Path | None = None,
    ) -> None:
        super().__init__(*args)
        # Keyword-only fields: pickling (cls(*args), then __dict__) restores them.
        self.index = index
        self.value = value
        self.position = position
        self.tensor = tensor
        self.path = path

    def locate(self, shape: tuple[int, ...]) -> NonFiniteError:
        """Sets :attr:`position` from :attr:`index` for an input of ``shape`` (row-major) and,
        for 2-D and higher, names it in the message. Returns ``self``."""
        shape = tuple(int(d) for d in shape)
        total = 1
        for d in shape:
            total *= d
        if self.index is None or not 0 <= self.index < total:
            return self
        rest, position = int(self.index), []
        for d in reversed(shape):
            rest, i = divmod(rest, d)
            position.append(i)
        self.position = tuple(reversed(position))
        if len(shape) >= 2 and self.args and isinstance(self.args[0], str):
            self.args = (f"{self.args[0]} (position {self.position} of shape {shape})", *self.args[1:])
        return self


class CorruptFileError(ValueError):
    """A file is not a valid safetensors / packed checkpoint.

    Attributes: ``path`` (the file), ``reason`` (what is wrong with it) and ``tensor`` (the
    tensor whose header entry or data is at fault, ``None`` when the defect is not one tensor's).
    """

    path: Path | None = None
    tensor: str | None = None
    reason: str | None = None

    def __init__(
        self, *args: object, path: Path | None = None, tensor: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(*args)
        self.path = path
        self.tensor = tensor
        self.reason = reason


class InternalError(RuntimeError):
    """A bug in nybble: a Rust panic caught at the boundary of ``nybble._core``.

    Every input is validated before the core runs, so this should never be raised; when it is,
    it is an ordinary exception (``except Exception`` catches it, the CLI prints one line and
    exits 1) rather than an abort of the interpreter. Please report it with the message."""
