"""How a quantized row clips, as one small typed config validated once and passed whole (torchao's style).

Three modes for activations and the KV cache:
- `calibrated`: a ratio per layer and site chosen on calibration data (engine.quant.calibrate), each kept only where
  it lowers the end-to-end loss of the quantized model on calibration windows (engine.quant.clip_check);
- `fixed`: one activation ratio and one KV ratio everywhere (QuaRot's 0.9 and 0.95 by default);
- `none`: no clipping anywhere.

Separately, `weight_range_search` says whether weight rows shrink their range to the least |err|^2.4 of their own
(QuaRot's w_clip): used under `fixed`, and by GPTQ weights under `calibrated` (RTN weights are calibrated per row on
their output error instead); never under `none`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CLIP_MODES = ("calibrated", "fixed", "none")
CLIP_LABELS = {
    "calibrated": "calibrated per layer, kept where it lowers the calibration loss (never worse than none there)",
    "fixed": "fixed: weight search, A 0.9, KV 0.95 (QuaRot's)",
    "none": "none",
}
QUAROT_RATIOS = (0.9, 0.95)  # activations, KV cache: QuaRot's fixed clip ratios


@dataclass(frozen=True)
class ClipPolicy:
    """What clipping does for one quantized row; unset fields take the mode's defaults (see the module)."""

    mode: str = "calibrated"  # calibrated | fixed | none
    activation: float | None = None  # fixed: the activations' ratio (default 0.9); 1.0 otherwise
    kv: float | None = None  # fixed: the KV cache's ratio (default 0.95); 1.0 otherwise
    weight_range_search: bool | None = None  # default: on, except under none

    def __post_init__(self):
        if self.mode not in CLIP_MODES:
            raise ValueError(f"clipping must be one of {', '.join(CLIP_MODES)}, got {self.mode!r}")
        fixed = self.mode == "fixed"
        for name, default in (("activation", QUAROT_RATIOS[0]), ("kv", QUAROT_RATIOS[1])):
            value = getattr(self, name)
            if value is None:
                value = default if fixed else 1.0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"the {name} clip ratio must be a number in (0, 1] (1 = no clipping), got {value!r}")
            if not fixed and value != 1.0:
                raise ValueError(
                    f"a fixed {name} clip ratio ({value:g}) needs clipping mode fixed, not {self.mode}"
                    + (" (calibration chooses the ratios)" if self.mode == "calibrated" else "")
                )
            object.__setattr__(self, name, float(value))
        search = self.weight_range_search
        if search is None:
            search = self.mode != "none"
        if not isinstance(search, bool):
            raise ValueError(f"weight_range_search must be true or false, got {search!r}")
        if search and self.mode == "none":
            raise ValueError("clipping mode none clips nothing: it cannot take the weight range search (use fixed)")
        object.__setattr__(self, "weight_range_search", search)

    @staticmethod
    def parse(value: ClipPolicy | str | dict) -> ClipPolicy:
        """The one place a clipping setting from outside (a CLI flag, a page's radio, a JSON row) becomes a
        policy: a mode name takes that mode's defaults."""
        if isinstance(value, ClipPolicy):
            return value
        if isinstance(value, dict):
            return ClipPolicy.from_dict(value)
        return ClipPolicy(str(value).strip().lower())

    @property
    def calibrated(self) -> bool:
        return self.mode == "calibrated"

    @property
    def ratios(self) -> tuple[float, float]:
        """(activation, KV) ratios wherever no calibrated ratio applies: the fixed ones, else 1.0 (no clipping)."""
        return self.activation, self.kv

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> ClipPolicy:
        unknown = set(data) - {"mode", "activation", "kv", "weight_range_search"}
        if unknown:
            raise ValueError(f"unknown clipping fields {', '.join(sorted(unknown))}")
        return ClipPolicy(**data)

    def __str__(self) -> str:
        return self.mode
