"""Hadamard constructions, orthogonal modules, rotation fusion and online rotations, rotation files."""
