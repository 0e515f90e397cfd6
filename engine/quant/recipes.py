"""Methods as data: a recipe names a rotation and quantizer choices; bit settings are W-A-KV triples.

A new method is one line in RECIPES, not a new code path.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from engine.rotation.fusion import RotationConfig

PRESETS = ("16-16-16", "4-16-16", "4-8-16", "4-4-16", "4-4-4")
_BITS_FORMS = (re.compile(r"(\d+)-(\d+)-(\d+)"), re.compile(r"W(\d+)A(\d+)KV(\d+)", re.IGNORECASE))  # 4-4-16, W4A4KV16


@dataclass(frozen=True)
class Bits:
    """Bit widths of weights, activations and KV cache; 16 means left in floating point."""

    w: int = 16
    a: int = 16
    kv: int = 16

    def __post_init__(self):
        for name, b in (("weight", self.w), ("activation", self.a), ("KV-cache", self.kv)):
            if not isinstance(b, int) or not 2 <= b <= 16:
                raise ValueError(f"{name} bits must be an integer from 2 to 16, got {b!r}")

    @staticmethod
    def parse(text: str) -> "Bits":
        """'4-4-4' -> Bits(4, 4, 4)."""
        match = next((m for form in _BITS_FORMS if (m := form.fullmatch(str(text).strip()))), None)
        if match is None:
            raise ValueError(f"bits must look like W-A-KV, e.g. 4-4-16 or W4A4KV16 (presets: {', '.join(PRESETS)}); "
                             f"got {text!r}")
        return Bits(*(int(p) for p in match.groups()))

    def __str__(self) -> str:
        return f"{self.w}-{self.a}-{self.kv}"


@dataclass(frozen=True)
class Recipe:
    """How to build the model for one evaluation row."""

    name: str
    description: str
    rotation: RotationConfig = RotationConfig()
    weights: str = "rtn"          # rtn | gptq | qrazor
    activations: str = "rtn"      # rtn | qrazor
    w_clip_search: bool = True    # shrink each row's range to minimise |err|^2.4 (QuaRot's w_clip)
    w_group: int | None = None
    a_clip: float = 0.9           # QuaRot's activation clip ratio
    kv_clip: float = 0.95
    quantize: bool = True         # False: the floating-point model whatever the bits

    def __post_init__(self):
        from engine.quant.methods import ACTIVATION_METHODS, WEIGHT_METHODS

        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"weight quantizer must be one of {', '.join(WEIGHT_METHODS)}, got {self.weights!r}")
        if self.activations not in ACTIVATION_METHODS:
            raise ValueError(f"activation quantizer must be one of {', '.join(ACTIVATION_METHODS)}, "
                             f"got {self.activations!r}")

    def with_weights(self, method: str) -> "Recipe":
        return replace(self, weights=method) if method else self

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> dict:
        """What a cache key holds (a rotation file by its content hash: RotationConfig.key)."""
        return {**self.to_dict(), "rotation": self.rotation.key()}


_HADAMARD_ALL = RotationConfig(r1="hadamard", r2="hadamard", r3="hadamard", r4="hadamard")

RECIPES: dict[str, Recipe] = {
    "fp": Recipe("fp", "floating point: no rotation, no quantization", quantize=False),
    "rtn": Recipe("rtn", "round-to-nearest quantization, no rotation"),
    "quarot": Recipe("quarot", "random Hadamard R1-R4 (QuaRot), then quantize", rotation=_HADAMARD_ALL),
    "rotated": Recipe("rotated", "rotations loaded from a file (e.g. learned by SpinQuant), then quantize",
                      rotation=RotationConfig(r1="file", r2="file", r3="hadamard", r4="hadamard", file="")),
    "qrazor": Recipe("qrazor", "QRazor: absmax base precision (W8 A16 KV8), then SDR razoring to the bits",
                     weights="qrazor", activations="qrazor", w_clip_search=False, a_clip=1.0, kv_clip=1.0),
}


def get_recipe(name: str, weights: str | None = None, rotation_file: str | None = None) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    if name == "rotated":
        if not rotation_file:
            raise ValueError("recipe 'rotated' needs a rotation file (SpinQuant layout)")
        r = replace(r, rotation=replace(r.rotation, file=rotation_file))
    if weights and name not in ("fp", "qrazor"):
        r = r.with_weights(weights)
    return r
