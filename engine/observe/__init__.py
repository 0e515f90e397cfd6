"""Activation capture, streaming statistics, before/after comparison."""
