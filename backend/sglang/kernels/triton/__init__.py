"""Triton kernels of the native runner, grouped by op; `triton_ops` is their kernel-set face."""
