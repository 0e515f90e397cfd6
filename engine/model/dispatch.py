"""Models larger than one device: a placement plan before loading, and weight access on dispatched models.

Loading uses accelerate's dispatch through `from_pretrained(device_map=...)`: decoder layers are spread over the
GPUs, then CPU memory, then disk (`max_memory` caps each device). Offloaded modules keep their weights on the meta
device and an accelerate hook brings them to the execution device for each forward, from a CPU state dict or
from files on disk. Everything that edits weights (norm folding, rotation fusion, fake quantization) goes
through `read_tensor` / `write_tensor`, so an edit of an offloaded weight lands where the hook reads it (the CPU
dict, or a new file in this load's own offload folder, never the model's files).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

GiB = 1 << 30
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|KiB|KB|B)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GiB, "gb": 10**9, "mib": 1 << 20, "mb": 10**6, "kib": 1 << 10, "kb": 10**3, "b": 1}


class PlacementError(ValueError):
    """A model that cannot be placed within the given memory, with a message meant for the user."""


def parse_size(text: str) -> int:
    """'20GiB', '512 MiB', '1.5GB', '1000' (bytes) -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise PlacementError(f"cannot read the memory size {text!r}; write e.g. 20GiB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def _device_key(name: str):
    """'cuda:1' / '1' -> 1 (accelerate's key for a GPU), 'cpu' -> 'cpu'."""
    name = name.strip().lower()
    if name == "cpu":
        return "cpu"
    m = re.fullmatch(r"(?:cuda:)?(\d+)", name)
    if not m:
        raise PlacementError(f"unknown device {name!r} in the memory budget; use cuda:N (or N) and cpu")
    index = int(m.group(1))
    if index >= torch.cuda.device_count():
        raise PlacementError(f"device cuda:{index} is not present (this machine has {torch.cuda.device_count()} GPUs)")
    return index


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.1f} MiB"


def device_name(key) -> str:
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def parse_max_memory(text: str | None) -> dict:
    """'cuda:0=20GiB,cpu=64GiB' -> {0: bytes, 'cpu': bytes}; None or '' -> None (accelerate's defaults)."""
    if not text or not text.strip():
        return None
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise PlacementError(f"memory budget entry {part!r} must look like device=size, e.g. cuda:0=20GiB")
        dev, size = part.split("=", 1)
        out[_device_key(dev)] = parse_size(size)
    return out


def default_max_memory() -> dict:
    """What accelerate would use: most of each GPU's free memory and of the CPU's available memory."""
    from accelerate.utils import get_max_memory

    return {k: v for k, v in get_max_memory().items() if k != "mps"}


@dataclass
class Placement:
    """Where each top-level block of a model goes, and the weight bytes per device, computed before loading."""

    device_map: dict  # module name -> 0, 1, ... | "cpu" | "disk" (accelerate's format)
    module_bytes: dict  # module name -> weight bytes in the load dtype
    dtype: str
    offload_dir: str | None = None
    notes: list = field(default_factory=list)

    @property
    def device_bytes(self) -> dict:
        out: dict = {}
        for name, dev in self.device_map.items():
            out[device_name(dev)] = out.get(device_name(dev), 0) + self.module_bytes.get(name, 0)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(self.module_bytes.get(n, 0) for n in self.device_map)

    @property
    def devices(self) -> list[str]:
        """The devices used: GPUs in index order, then 'cpu', then 'disk'."""
        used = set(self.device_map.values())
        return [
            device_name(d)
            for d in sorted(used, key=lambda d: (0, d) if isinstance(d, int) else (1 if d == "cpu" else 2, 0))
        ]

    def rows(self) -> list[dict]:
        """One row per placed block: module, device, MiB (for tables in the CLI and the page)."""
        return [
            {
                "module": n or "(whole model)",
                "device": device_name(d),
                "MiB": round(self.module_bytes.get(n, 0) / (1 << 20), 1),
            }
            for n, d in self.device_map.items()
        ]

    def summary(self) -> str:
        per = ", ".join(f"{d} {fmt_bytes(b)}" for d, b in self.device_bytes.items())
        return f"{fmt_bytes(self.total_bytes)} of {self.dtype} weights: {per}"


def plan(
    config,
    dtype: torch.dtype,
    dtype_name: str,
    max_memory: dict | None = None,
    offload_dir: str | None = None,
    device_map: dict | None = None,
) -> Placement:
    """Plan the placement of a model of this config (no weights are read): accelerate's infer_auto_device_map
    within max_memory, or an explicit device_map (module name -> cuda index, "cpu" or "disk") checked against
    the model. Raises PlacementError when it does not fit: blocks would go to disk but disk offload is off
    (offload_dir None), or the disk lacks the room."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    budget = dict(max_memory) if max_memory else default_max_memory()
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False):  # as from_pretrained will: no extra memory, one device
        skeleton.get_output_embeddings().weight = skeleton.get_input_embeddings().weight
    if device_map is None:
        no_split = list(getattr(skeleton, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    else:
        device_map = {
            name: (_device_key(dev) if isinstance(dev, str) and dev not in ("cpu", "disk") else dev)
            for name, dev in device_map.items()
        }
        _check_covers(skeleton, device_map)
    notes = _keep_tied_together(skeleton, device_map)
    sizes = compute_module_sizes(skeleton, dtype=dtype)
    placement = Placement(
        dict(device_map), {n: int(sizes.get(n, 0)) for n in device_map}, dtype_name, offload_dir, notes
    )
    on_disk = placement.device_bytes.get("disk", 0)
    if on_disk:
        given = ", ".join(f"{device_name(k)} {fmt_bytes(v)}" for k, v in budget.items())
        if offload_dir is None:
            raise PlacementError(
                f"the model does not fit: its {fmt_bytes(placement.total_bytes)} of {dtype_name} weights exceed "
                f"the budgets ({given}) by {fmt_bytes(on_disk)}. Raise the budgets, "
                + ("load in a 16-bit dtype, " if dtype == torch.float32 else "")
                + "or allow disk offload"
            )
        free = shutil.disk_usage(_existing_parent(offload_dir)).free
        if free < on_disk * 1.1:
            raise PlacementError(
                f"disk offload needs {fmt_bytes(on_disk)} but the disk of {offload_dir} has {fmt_bytes(free)} free"
            )
        placement.notes.append(f"{fmt_bytes(on_disk)} offloaded to disk: every forward reads it back (slow)")
    return placement


def _check_covers(model: nn.Module, device_map: dict) -> None:
    """Every parameter and buffer must fall under exactly one entry of an explicit device map."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    unknown = [k for k in device_map if k and not any(n == k or n.startswith(k + ".") for n in names)]
    if unknown:
        raise PlacementError(f"device map names modules the model does not have: {unknown[:5]}")
    missing = [n for n in names if not any(k == "" or n == k or n.startswith(k + ".") for k in device_map)]
    if missing:
        raise PlacementError(f"device map leaves {len(missing)} tensors unplaced, e.g. {missing[:3]}")


def _entry(device_map: dict, param: str) -> str:
    """The device-map key that places `param` (the longest matching module prefix)."""
    keys = [k for k in device_map if k == "" or param == k or param.startswith(k + ".")]
    return max(keys, key=len)


def _keep_tied_together(model: nn.Module, device_map: dict) -> list[str]:
    """Tied weights (lm_head = the embedding) must be placed on one device, or the offloaded copy has nothing
    to load: move a module that holds only a tied weight next to its twin, else refuse."""
    from accelerate.utils import find_tied_parameters

    groups = [list(g) for g in find_tied_parameters(model)]
    declared = getattr(model, "_tied_weights_keys", None)  # transformers 5: {tied: source}, tied at load time
    if isinstance(declared, dict) and getattr(model.config, "tie_word_embeddings", False):
        groups += [[source, tied] for tied, source in declared.items()]
    notes = []
    order = {k: i for i, k in enumerate(device_map)}
    for group in groups:
        group = sorted(group, key=lambda p: order[_entry(device_map, p)])  # the one nearest the input stays
        first = _entry(device_map, group[0])
        for other in group[1:]:
            key = _entry(device_map, other)
            if device_map[key] == device_map[first]:
                continue
            if other.rsplit(".", 1)[0] != key:
                raise PlacementError(f"tied weights {group} must be placed on one device; put {key} with {first}")
            notes.append(f"{key} is tied to {group[0]}: placed with it on {device_name(device_map[first])}")
            device_map[key] = device_map[first]
    return notes


def _existing_parent(path: str):
    from pathlib import Path

    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return p


# ---- dispatched models ----------------------------------------------------------------------------------------
def is_dispatched(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None)) and any(hasattr(m, "_hf_hook") for m in model.modules())


def is_offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(hook is not None and getattr(hook, "offload", False))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its hook's execution device if dispatched, else where its parameters are."""
    for m in module.modules():  # a container (an attention block) has no hook of its own; its linears do
        hook = getattr(m, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None) if hook is not None else None
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's execution device."""
    return execution_device(model.get_input_embeddings())


def read_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The current value of module.<name> on the module's execution device (offloaded: a fresh copy)."""
    if is_offloaded(module) and name in module._hf_hook.weights_map:
        return module._hf_hook.weights_map[name].to(execution_device(module))
    return getattr(module, name).data


def write_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set module.<name> to `value` (cast to the stored dtype), where the forward will read it."""
    if is_offloaded(module) and name in module._hf_hook.weights_map:
        weights = module._hf_hook.weights_map  # accelerate PrefixedDataset over a loader or a dict
        old_dtype = weights[name].dtype
        _store(weights.dataset, weights.prefix + name, value.detach().to("cpu", old_dtype).contiguous())
        return
    p = getattr(module, name)
    p.data = value.to(device=p.device, dtype=p.dtype).contiguous()


def _store(loader, key: str, value: torch.Tensor) -> None:
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    if isinstance(loader, OffloadedWeightsLoader):
        if key in loader.state_dict:  # CPU offload: the tensor lives in memory
            loader.state_dict[key] = value
            return
        if loader.save_folder is None:
            raise RuntimeError(f"offloaded weight {key} has no offload folder to write to")
        offload_weight(value, key, loader.save_folder, index=loader.index)  # a new .dat file, index re-pointed
        return
    if isinstance(loader, dict):
        loader[key] = value
        return
    raise RuntimeError(f"unsupported offload storage {type(loader).__name__} for {key}")
