"""Backends that run a model behind one small interface (native PyTorch, llama.cpp)."""
