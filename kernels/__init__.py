"""Custom GPU kernels (Triton) with PyTorch references beside them."""
