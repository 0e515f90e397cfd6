"""Architectures as data, loading (default model, directories, GGUF), dispatch over devices, the attention entry."""
