"""CPU emulation of the CUDA kernels for tests (see emulator.py); not part of the package."""
