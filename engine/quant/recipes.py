"""Methods as data: a recipe names a rotation and quantizer choices; bit settings are W-A-KV triples.

A new method is one line in RECIPES, not a new code path.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from engine.quant.clipping import CLIP_LABELS, CLIP_MODES, ClipPolicy  # noqa: F401 - the labels, for pages
from engine.quant.formats import Format, IntFormat, parse_format
from engine.rotation.fusion import RotationConfig

PRESETS = ("16-16-16", "4-16-16", "4-8-16", "4-4-16", "4-4-4")
FORMAT_PRESETS = ("mxfp4-mxfp4-16", "nvfp4-nvfp4-16", "fp8-fp8-16", "nvfp4-nvfp4-fp8")
_BITS_FORMS = (re.compile(r"([\w.]+)-([\w.]+)-([\w.]+)"), re.compile(r"W(\d+)A(\d+)KV(\d+)", re.IGNORECASE))


@dataclass(frozen=True)
class Bits:
    """What each of weights, activations and KV cache becomes: an integer bit width (16 = left in floating point;
    weights per row symmetric, activations per token asymmetric, KV per head asymmetric: the role decides the
    grid) or a named number format (engine.quant.formats: mxfp4, nvfp4, fp8, int4g128, ...), each quantized along
    its last dim. Names are resolved once, here: a part holds an int or a Format object."""

    w: int | Format = 16
    a: int | Format = 16
    kv: int | Format = 16

    def __post_init__(self):
        for field, name in (("w", "weight"), ("a", "activation"), ("kv", "KV-cache")):
            value = getattr(self, field)
            if isinstance(value, Format):
                fmt = value
            elif isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(
                    f"{name} bits must be an integer bit width from 2 to 16 or a format name, got {value!r}"
                )
            elif isinstance(value, int) and not 2 <= value <= 16:
                raise ValueError(f"{name} bits must be an integer from 2 to 16, got {value!r}")
            else:
                try:
                    fmt = parse_format(str(value))
                except ValueError as e:
                    raise ValueError(
                        f"bits must look like W-A-KV, each part a bit width or a format; the {name} part: {e}"
                    ) from None
            # a plain bit width stays an int (the role's own integer grid); any other format as its Format object
            plain = fmt is None or fmt == IntFormat(fmt.element_bits)
            object.__setattr__(self, field, (16 if fmt is None else fmt.element_bits) if plain else fmt)

    @staticmethod
    def parse(text: str) -> Bits:
        """'4-4-4' -> Bits(4, 4, 4); 'mxfp4-mxfp4-16' -> Bits(MXFormat('e2m1'), MXFormat('e2m1'), 16)."""
        match = next((m for form in _BITS_FORMS if (m := form.fullmatch(str(text).strip()))), None)
        if match is None:
            raise ValueError(
                f"bits must look like W-A-KV, each a bit width or a format, e.g. 4-4-16, W4A4KV16 or "
                f"mxfp4-mxfp4-16 (presets: {', '.join(PRESETS + FORMAT_PRESETS)}); got {text!r}"
            )
        return Bits(*(int(p) if p.isdigit() else p.lower() for p in match.groups()))

    def quantizes(self, part: str) -> bool:
        """Whether 'w', 'a' or 'kv' is quantized at all (not left at 16 bits)."""
        return getattr(self, part) != 16

    def format(self, part: str) -> Format | None:
        """The named format of 'w', 'a' or 'kv', or None for a plain bit width."""
        value = getattr(self, part)
        return value if isinstance(value, Format) else None

    def label(self, part: str) -> str:
        """A part as written: its bit width or its format's name."""
        value = getattr(self, part)
        return value.name if isinstance(value, Format) else str(value)

    @property
    def integer(self) -> bool:
        """Only plain bit widths (what training and QRazor take)."""
        return all(isinstance(getattr(self, p), int) for p in ("w", "a", "kv"))

    def __str__(self) -> str:
        return "-".join(self.label(p) for p in ("w", "a", "kv"))


@dataclass(frozen=True)
class Recipe:
    """How to build the model for one evaluation row."""

    name: str
    description: str
    rotation: RotationConfig = RotationConfig()
    weights: str = "rtn"  # rtn | gptq | qrazor
    activations: str = "rtn"  # rtn | qrazor
    clip: ClipPolicy = ClipPolicy()  # calibrated | fixed | none, and the weight range search (engine.quant.clipping)
    w_group: int | None = None
    quantize: bool = True  # False: the floating-point model whatever the bits

    def __post_init__(self):
        from engine.quant.methods import ACTIVATION_METHODS, WEIGHT_METHODS

        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"weight quantizer must be one of {', '.join(WEIGHT_METHODS)}, got {self.weights!r}")
        if not isinstance(self.clip, ClipPolicy):
            raise ValueError(
                f"a recipe's clipping is a ClipPolicy (ClipPolicy.parse('{self.clip}')), got {type(self.clip).__name__}"
            )
        if self.activations not in ACTIVATION_METHODS:
            raise ValueError(
                f"activation quantizer must be one of {', '.join(ACTIVATION_METHODS)}, got {self.activations!r}"
            )

    @property
    def weight_range_search(self) -> bool:
        """Whether weight rows take QuaRot's |err|^2.4 range search: the policy's flag under fixed clips, and for
        GPTQ weights under calibrated ones (calibrated RTN weights pick each row's shrink on its output error)."""
        return self.clip.weight_range_search and (self.clip.mode == "fixed" or self.weights == "gptq")

    def with_weights(self, method: str) -> Recipe:
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
    "rotated": Recipe(
        "rotated",
        "rotations loaded from a file (e.g. learned by SpinQuant), then quantize",
        rotation=RotationConfig(r1="file", r2="file", r3="hadamard", r4="hadamard", file=""),
    ),
    "qrazor": Recipe(
        "qrazor",
        "QRazor: absmax base precision (W8 A16 KV8), then SDR razoring to the bits",
        weights="qrazor",
        activations="qrazor",
        clip=ClipPolicy("none"),
    ),
}


def get_recipe(
    name: str, weights: str | None = None, rotation_file: str | None = None, clip: ClipPolicy | str | None = None
) -> Recipe:
    """A recipe by name, with another weight quantizer, rotation file or clipping (a policy, or a mode name parsed
    by ClipPolicy.parse) where given."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    if name == "rotated":
        if not rotation_file:
            raise ValueError("recipe 'rotated' needs a rotation file (SpinQuant layout)")
        r = replace(r, rotation=_from_file(r.rotation, rotation_file))
    if weights and name not in ("fp", "qrazor"):
        r = r.with_weights(weights)
    if clip and name not in ("fp", "qrazor"):  # QRazor's SDR has no clip ratio
        r = replace(r, clip=ClipPolicy.parse(clip))
    return r


def _from_file(rotation: RotationConfig, path: str) -> RotationConfig:
    """The 'rotated' recipe's rotations: R1, R2 from the file, and R3, R4 too when the file holds them (FLRot,
    layer-wise training), else random Hadamards. A file that cannot be read is refused later, where it is read."""
    from engine.rotation.files import load_rotation_file

    try:
        keys = load_rotation_file(path).keys()
    except ValueError:
        return replace(rotation, file=path)
    online = {
        r: "file" for r, suffix in (("r3", ".self_attn.R3"), ("r4", ".mlp.R4")) if any(k.endswith(suffix) for k in keys)
    }
    return replace(rotation, file=path, **online)
