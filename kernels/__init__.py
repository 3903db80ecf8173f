"""Triton kernels, installed as `rmserve.kernels`. Each kernel file holds the kernel, a launcher
that checks shapes, and the plain-PyTorch `*_ref` that is the CPU path and the test oracle."""
