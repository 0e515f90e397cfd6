"""Quantizers, GPTQ, QRazor, applying them to a model, and the recipes that combine them with rotations."""
