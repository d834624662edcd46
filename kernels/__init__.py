"""The ground floor's GPU kernels (Triton), each with its PyTorch reference beside it; imports nothing of ours."""
