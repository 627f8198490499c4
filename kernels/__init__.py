"""Triton kernels of dsv3conv, each beside its plain-torch reference (installed as `dsv3conv.kernels`)."""
