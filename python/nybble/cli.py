"""The ``nybble`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="nybble")
def main() -> None:
    """nybble: bitsandbytes-compatible 4-bit / 8-bit quantization with a Rust core."""
