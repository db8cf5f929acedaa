"""GPU kernels (Triton), each with a PyTorch reference that runs on CPU and in tests."""
