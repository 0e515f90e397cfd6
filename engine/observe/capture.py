"""Activation capture: hooks at every site the rotations touch, streamed into bounded statistics.

`capture(...)` is a generator of events (Progress after each window with the per-layer table so far, then Done with
a CaptureResult). Results are cached under cache/capture/ keyed by model, corpus, budget, window and rotation tag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from engine import store
from engine.events import Done, Progress
from engine.model import attention, dispatch
from engine.model.arch import ArchInfo
from engine.model.early_stop import StopForward
from engine.observe import stats
from engine.observe.stats import SiteAccumulator

# site -> (description for the UI, what the channels are)
SITES: dict[str, str] = {
    "resid_attn": "residual stream entering attention (decoder-layer input, before its norm)",
    "attn_in": "input of q/k/v_proj (after the input RMSNorm)",
    "q": "queries after RoPE (heads x head_dim channels)",
    "k": "keys after RoPE (KV heads x head_dim channels)",
    "v": "values (KV heads x head_dim channels)",
    "o_in": "input of o_proj (attention output)",
    "resid_mlp": "residual stream entering the MLP (before its norm)",
    "mlp_in": "input of gate/up_proj (after the post-attention RMSNorm)",
    "down_in": "input of down_proj (SiLU(gate) * up)",
}
RESIDUAL_SITES = ("resid_attn", "resid_mlp")
# An architecture outside the table (engine.model.generic): resid_attn is each block's input, and every linear of the
# block is a site of its own, linear_in[its module path]; any of the linear-input sites above asks for them.
GENERIC_SITES: dict[str, str] = {
    "linear_in": "input of a linear of the decoder block (a model outside the architecture table: by module path)",
}
LINEAR_INPUT_SITES = {"attn_in", "o_in", "mlp_in", "down_in", "linear_in"}


@dataclass(frozen=True)
class CaptureConfig:
    tokens: int = 2048  # token budget
    window: int = 512  # tokens per window; position 0 of each window is an attention sink
    batch: int = 1  # windows per forward pass
    split: str = "calib"
    sites: tuple = tuple(SITES)
    rotation: str = "none"  # tag of the rotation applied to the model (part of the cache key)
    sqnr_bits: tuple = ()  # also measure per-token RTN quantization SQNR (dB) at these bit widths

    def __post_init__(self):
        if self.tokens <= 0:
            raise ValueError(f"token budget must be positive, got {self.tokens}")
        if self.window <= 1:
            raise ValueError(f"window length must be at least 2 tokens, got {self.window}")
        if self.batch <= 0:
            raise ValueError(f"batch must be positive, got {self.batch}")
        unknown = set(self.sites) - set(SITES) - set(GENERIC_SITES)
        if unknown:
            raise ValueError(f"unknown capture sites {sorted(unknown)}; known: {', '.join(SITES)}")


@dataclass
class CaptureResult:
    """Per-layer, per-site statistics. `table` has one row per (layer, site); arrays are keyed 'L{i}.{site}.{name}'."""

    meta: dict
    table: pd.DataFrame
    arrays: dict = field(repr=False)

    def array(self, layer: int, site: str, name: str) -> torch.Tensor:
        return self.arrays[f"L{layer}.{site}.{name}"]

    @property
    def sites(self) -> list[str]:
        """The sites captured, in SITES order, a mixture's per-expert sites after their base site."""
        return sorted(set(self.table.site), key=site_order) if len(self.table) else []

    def expert_tokens(self) -> pd.DataFrame | None:
        """Tokens routed to each expert [layer x expert] (a mixture of experts), or None for a dense model."""
        rows = self.table[self.table.site.str.startswith("down_in[expert")]
        if not len(rows):
            return None
        expert = rows.site.str.extract(r"expert(\d+)")[0].astype(int)
        return rows.assign(expert=expert).pivot(index="layer", columns="expert", values="tokens").fillna(0)

    def site_table(self, site: str) -> pd.DataFrame:
        return self.table[self.table.site == site].set_index("layer")

    def outlier_channels(self, layer: int, site: str, include_sink: bool = False, factor: float = 6.0) -> list[int]:
        """Channels whose absmax exceeds `factor` times the median channel absmax."""
        am = self.array(layer, site, "absmax" if include_sink else "absmax_nosink")
        med = float(am.median())
        return [] if med <= 0 else torch.nonzero(am > factor * med).flatten().tolist()

    def summary(self) -> pd.DataFrame:
        """The per-layer residual-stream table the CLI prints."""
        t = self.table[self.table.site.isin(RESIDUAL_SITES)]
        cols = [
            "kurt_token_mean_nosink",
            "kurt_token_max_nosink",
            "kurt_tensor",
            "kurt_tensor_nosink",
            "absmax",
            "absmax_nosink",
            "massive_ratio",
        ]
        return t.pivot_table(index="layer", columns="site", values=cols).round(2)


def _flat_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, hd] -> [B, T, heads*hd]."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)


def site_label(site: str) -> str:
    """'down_in[expert3]: input of down_proj (...), expert3 only (the tokens routed to it)'."""
    base, _, expert = site.partition("[")
    if base in GENERIC_SITES:
        return f"{site}: {GENERIC_SITES[base]}"
    return f"{site}: {SITES[base]}" + (f", {expert.rstrip(']')} only (the tokens routed to it)" if expert else "")


def site_order(site: str) -> tuple[int, int, str]:
    """Sort key of a site: its place in SITES, then the expert (down_in[expert3] after down_in[expert2]), then a
    generic linear's module path."""
    base, _, expert = site.partition("[")
    tail = expert.rstrip("]")
    rank = int(tail[6:]) + 1 if tail.startswith("expert") else 0 if not tail else 10**6
    return [*SITES, *GENERIC_SITES].index(base), rank, tail


class _SiteHooks:
    """Forward hooks at `sites` of the chosen decoder layers (every layer by default), each calling
    feed(layer, site, x) with x [batch, tokens, channels] as the model computes it (q/k/v heads flattened);
    remove() restores the model."""

    def __init__(self, model: nn.Module, arch: ArchInfo, sites: tuple, feed, layers=None):
        self.handles = []
        self.qkv_hooks = []
        if not arch.roles.generic:  # a generic model's attention is not hooked (no q/k/v sites)
            attention.install(model)
        for i in range(arch.n_layers) if layers is None else layers:
            (self._generic_layer if arch.roles.generic else self._layer)(model, arch, i, set(sites), feed)

    def _generic_layer(self, model, arch, i, want, feed):
        """Block input and every linear's input of a model outside the table (engine.model.generic)."""
        block = arch.layer(model, i)
        if "resid_attn" in want:  # the block's hidden states come first, or by name
            self.handles.append(
                block.register_forward_pre_hook(
                    lambda m, args, kwargs: feed(i, "resid_attn", args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            )
        if want & LINEAR_INPUT_SITES:
            for path in arch.linears:
                site = f"linear_in[{path}]"
                self.handles.append(
                    block.get_submodule(path).register_forward_pre_hook(
                        lambda m, args, site=site: feed(i, site, args[0])
                    )
                )

    def _layer(self, model, arch, i, want, feed):
        mod = lambda role: arch.module(model, role, i)  # noqa: E731

        def pre(site):
            return lambda m, args: feed(i, site, args[0])

        def routed(site):  # an expert's input holds the rows of the tokens routed to it (engine.model.experts)
            return lambda m, args: feed(i, site, args[0], getattr(m, "routed_rows", None))

        def post(site):
            return lambda m, args, out: feed(i, site, out)

        r = arch.roles
        # A family without a norm before a sublayer (OLMo-2) feeds the residual stream straight into its linears:
        # the stream and the linear's input are then one tensor, read where the linear receives it.
        attn = ("input_norm", "pre", "input_norm", "post") if r.input_norm else (r.attn_reader, "pre") * 2
        mlp = ("post_attn_norm", "pre", "post_attn_norm", "post") if r.post_attn_norm else (r.mlp_reader, "pre") * 2
        hooks = [
            ("resid_attn", *attn[:2]),
            ("attn_in", *attn[2:]),
            ("o_in", "o", "pre"),
            ("resid_mlp", *mlp[:2]),
            ("mlp_in", *mlp[2:]),
        ]
        for site, role, kind in hooks:
            if site in want:
                m = mod(role)
                h = m.register_forward_pre_hook(pre(site)) if kind == "pre" else m.register_forward_hook(post(site))
                self.handles.append(h)
        if "down_in" in want:  # one site per expert in a mixture: down_in[expert3], down_in[shared]
            for role in arch.down_roles:
                site = "down_in" if role == "down" else f"down_in[{role.partition('.')[0]}]"
                self.handles.append(mod(role).register_forward_pre_hook(routed(site)))
        if want & {"q", "k", "v"}:

            def qkv(m, q, k, v):
                for site, t in (("q", q), ("k", k), ("v", v)):
                    if site in want:
                        feed(i, site, _flat_heads(t))
                return q, k, v

            attn = arch.module(model, "attn", i) if arch.roles.attn else None
            attention.add_hook(attn, qkv)
            self.qkv_hooks.append((attn, qkv))

    def remove(self):
        for h in self.handles:
            h.remove()
        for attn, hook in self.qkv_hooks:
            attention.remove_hook(attn, hook)


class _Hooks(_SiteHooks):
    """Site hooks feeding one SiteAccumulator per (layer, site) over every layer."""

    def __init__(self, model: nn.Module, arch: ArchInfo, sites: tuple, seed: int = 0, sqnr_bits: tuple = ()):
        self.acc: dict[tuple[int, str], SiteAccumulator] = {}
        self.ids: torch.Tensor | None = None
        self.window_index = 0
        self.sites = sites
        self.seed = seed
        self.sqnr_bits = tuple(sqnr_bits)
        super().__init__(model, arch, sites, self._feed)

    def _feed(self, layer: int, site: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        key = (layer, site)
        if key not in self.acc:
            self.acc[key] = SiteAccumulator(
                x.shape[-1],
                seed=self.seed + 7919 * layer + 31 * site_order(site)[0] + site_order(site)[1],
                sqnr_bits=self.sqnr_bits,
            )
        if x.dim() == 2 and rows is None:  # every token, flattened (a shared expert)
            rows = torch.arange(x.shape[0])
        self.acc[key].update(x, self.ids, self.window_index, rows)


def layer_sites(
    model: nn.Module, arch: ArchInfo, ids: torch.Tensor, layer: int, sites: tuple = tuple(SITES)
) -> dict[str, torch.Tensor]:
    """The raw tensors at `sites` of decoder `layer` for one forward pass of `ids` [batch, tokens]:
    {site: float32 [batch, tokens, channels]} on the CPU, in the order of `sites`, hooked exactly where capture()
    hooks them. The forward stops after that layer (later layers cost nothing); every hook is removed after."""
    if not isinstance(layer, int) or not 0 <= layer < arch.n_layers:
        raise ValueError(f"layer must be an int in [0, {arch.n_layers - 1}], got {layer!r}")
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown capture sites {sorted(unknown)}; known: {', '.join(SITES)}")
    arch.check_known_roles("show the named sites of a layer")
    got: dict[str, torch.Tensor] = {}

    def keep(i, site, x, rows=None):
        got[site] = x.detach().float().cpu().clone()

    def stop(module, args, out):
        raise StopForward

    hooks = _SiteHooks(model, arch, sites, keep, layers=(layer,))
    hooks.handles.append(arch.layer(model, layer).register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(ids.to(dispatch.input_device(model)), use_cache=False)
    except StopForward:
        pass
    finally:
        hooks.remove()
    return {site: got[site] for site in sites}


def _result(hooks: _Hooks, meta: dict) -> CaptureResult:
    rows, arrays = [], {}
    for (layer, site), acc in sorted(hooks.acc.items(), key=lambda kv: (kv[0][0], *site_order(kv[0][1]))):
        rows.append({"layer": layer, "site": site, "channels": acc.c, **acc.scalars()})
        for name, t in acc.tensors().items():
            arrays[f"L{layer}.{site}.{name}"] = t
    return CaptureResult(meta=meta, table=pd.DataFrame(rows), arrays=arrays)


def cache_key(model_fingerprint: str, corpus_fingerprint: str, cfg: CaptureConfig) -> str:
    return store.make_key(
        kind="capture",
        model=model_fingerprint,
        corpus=corpus_fingerprint,
        tokens=cfg.tokens,
        window=cfg.window,
        split=cfg.split,
        sites=list(cfg.sites),
        rotation=cfg.rotation,
        sqnr=list(cfg.sqnr_bits),
        stats=stats.CODE_VERSION,
    )


def load_cached(key: str) -> CaptureResult | None:
    hit = store.load("capture", key)
    if hit is None:
        return None
    meta, arrays = hit
    return CaptureResult(meta=meta["meta"], table=pd.DataFrame(meta["table"]), arrays=arrays)


def capture(
    model: nn.Module,
    arch: ArchInfo,
    windows: torch.Tensor,
    cfg: CaptureConfig,
    meta: dict | None = None,
    key: str | None = None,
    seed: int = 0,
    partial_every: int = 1,
):
    """Run `windows` [N, T] through the model with hooks; yield Progress per batch, then Done(CaptureResult).

    With `key`, a valid cached result is returned at once and a fresh one is saved atomically at the end. A stopped
    generator (closed by the caller) removes its hooks and saves nothing.
    """
    meta = {
        **(meta or {}),
        "tokens": int(windows.numel()),
        "window": int(windows.shape[1]),
        "n_windows": int(windows.shape[0]),
        "rotation": cfg.rotation,
        "n_layers": arch.n_layers,
        "sites": list(cfg.sites),
    }
    if key is not None:
        hit = load_cached(key)
        if hit is not None:
            yield Done(hit, cached=True)
            return
    device = dispatch.input_device(model)
    hooks = _Hooks(model, arch, cfg.sites, seed, cfg.sqnr_bits)
    t0 = time.perf_counter()
    n = windows.shape[0]
    try:
        with torch.no_grad():
            for start in range(0, n, cfg.batch):
                batch = windows[start : start + cfg.batch]
                hooks.ids, hooks.window_index = batch, start
                model(batch.to(device), use_cache=False)
                done = min(start + cfg.batch, n)
                partial = None
                if done == n or (done // cfg.batch) % partial_every == 0:
                    partial = pd.DataFrame(
                        [{"layer": layer, "site": s, **a.scalars()} for (layer, s), a in hooks.acc.items()]
                    )
                yield Progress("capture", done, n, time.perf_counter() - t0, f"window {done}/{n}", partial=partial)
    finally:
        hooks.remove()
    result = _result(hooks, meta)
    seconds = time.perf_counter() - t0
    result.meta["seconds"] = seconds
    if key is not None:
        store.save("capture", key, {"meta": result.meta, "table": result.table.to_dict(orient="list")}, result.arrays)
    yield Done(result, seconds=seconds)


def capture_job(handle, corpus_name: str, cfg: CaptureConfig, use_cache: bool = True, model: nn.Module | None = None):
    """Capture on a loaded model (engine.model.loading.ModelHandle) over a named corpus: windows, cache key and meta.
    `model` overrides handle.model (a rotated copy); cfg.rotation must then name its rotation."""
    from engine.data.corpus import load_corpus
    from engine.data.corpus import windows as make_windows

    corpus = load_corpus(corpus_name)
    wins = make_windows(corpus, handle.tokenizer, cfg.tokens, min(cfg.window, handle.max_length), cfg.split)
    meta = {
        "model": handle.name,
        "model_note": handle.note,
        "corpus": corpus.name,
        "corpus_label": corpus.label,
        "dtype": handle.dtype,
    }
    key = cache_key(handle.fingerprint, corpus.fingerprint, cfg) if use_cache else None
    yield from capture(model if model is not None else handle.model, handle.arch, wins, cfg, meta=meta, key=key)
