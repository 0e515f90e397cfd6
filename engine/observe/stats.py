"""Streaming activation statistics with bounded memory.

Per channel: count, mean, and central moments M2, M3, M4 in float64, merged batch by batch with Pebay's exact
pairwise formulas (so streaming equals batch to rounding). The whole-tensor moments are the merge of all channels.
Tokens at position 0 of a window (the attention sink) are kept in a separate accumulator, so every view exists
with and without them. Kurtosis is Pearson's: a Gaussian gives 3, a Laplace 6, a uniform 1.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.quant.quantizers import quantize_activation

CODE_VERSION = "stats-3"  # bump when a change alters any statistic: cached captures stop matching
# stats-3: the quantizers and Hadamards of engine.evaluate eval-2 (SQNR sites, rotated captures)
TOP_TOKENS = 8  # largest-norm tokens kept per site
SAMPLE_ROWS = 64  # token rows kept (uniform reservoir) for histograms
NORM_SAMPLE = 2048  # token norms kept (uniform reservoir) for the median
SURFACE_TOKENS = 64  # tokens of the first window kept for the |x| surface
SURFACE_CHANNELS = 1024  # wider tensors are max-pooled down to at most this many channel bins


def state_bytes_bound(channels: int) -> int:
    """The most bytes of tensors one SiteAccumulator keeps, whatever the number of tokens it sees: float64 moments
    (mean, M2, M3, M4) and absmax for body and sink, the top tokens, the norm and row reservoirs (float32 keys and
    rows, a row carrying its sink flag) and the bfloat16 surface. A mixture's memory is sites x this."""
    return (
        8 * 10 * channels
        + 8 * 5 * TOP_TOKENS
        + 4 * 2 * NORM_SAMPLE
        + 4 * SAMPLE_ROWS * (channels + 2)
        + 2 * SURFACE_TOKENS * min(channels, SURFACE_CHANNELS)
    )


@dataclass
class Moments:
    """Per-channel central moments of n samples; all tensors [C] float64."""

    n: float
    mean: torch.Tensor
    m2: torch.Tensor
    m3: torch.Tensor
    m4: torch.Tensor

    @staticmethod
    def of(x: torch.Tensor) -> Moments:
        """Moments of a batch x [N, C]. Centred first, so float32 sums lose nothing that matters; merged in float64."""
        mean = x.mean(0)
        d = x - mean
        d2 = d * d
        return Moments(
            float(x.shape[0]), mean.double(), d2.sum(0).double(), (d2 * d).sum(0).double(), (d2 * d2).sum(0).double()
        )

    def merge(self, b: Moments) -> Moments:
        """Pebay (2008) pairwise update of central moments up to order four."""
        if self.n == 0:
            return b
        if b.n == 0:
            return self
        na, nb = self.n, b.n
        n = na + nb
        delta = b.mean - self.mean
        mean = self.mean + delta * nb / n
        m2 = self.m2 + b.m2 + delta**2 * na * nb / n
        m3 = self.m3 + b.m3 + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * b.m2 - nb * self.m2) / n
        m4 = (
            self.m4
            + b.m4
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * b.m2 + nb * nb * self.m2) / n**2
            + 4 * delta * (na * b.m3 - nb * self.m3) / n
        )
        return Moments(n, mean, m2, m3, m4)

    def pooled(self) -> tuple[float, float, float, float]:
        """(n, mean, variance, kurtosis) of all channels' samples taken together (the whole tensor)."""
        if self.n == 0:
            return 0.0, float("nan"), float("nan"), float("nan")
        mu = self.mean.mean()
        d = self.mean - mu
        m2 = (self.m2 + self.n * d**2).sum()
        m4 = (self.m4 + 4 * d * self.m3 + 6 * d**2 * self.m2 + self.n * d**4).sum()
        total = self.n * self.mean.numel()
        return total, float(mu), float(m2 / total), float(total * m4 / m2**2) if m2 > 0 else float("nan")

    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1.0)

    def kurtosis(self) -> torch.Tensor:
        """Per-channel kurtosis [C]."""
        return self.n * self.m4 / (self.m2**2).clamp_min(1e-300)  # a constant channel gives 0, as token_moments


def empty_moments(c: int) -> Moments:
    z = torch.zeros(c, dtype=torch.float64)
    return Moments(0.0, z.clone(), z.clone(), z.clone(), z.clone())


def _absmax0(x: torch.Tensor) -> torch.Tensor:
    """Per-channel max |x| of x [N, C] as float64 (amax/amin: aminmax over dim 0 is ~20x slower on CPU)."""
    return torch.maximum(x.amax(0), x.amin(0).neg()).double()


def token_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token row of x [N, C]: (kurtosis across channels [N], L2 norm [N]), from one centring pass."""
    mean = x.mean(1, keepdim=True)
    d2 = (x - mean).square_()
    m2 = d2.mean(1)
    kurt = d2.square_().mean(1) / m2.square().clamp_min(1e-30)
    norm = (x.shape[1] * (m2 + mean.squeeze(1).square())).sqrt()
    return kurt, norm


def pool_channels(a: torch.Tensor, max_channels: int = SURFACE_CHANNELS) -> torch.Tensor:
    """Max-pool the last dim into at most max_channels bins (keeps outliers visible in a small matrix)."""
    c = a.shape[-1]
    if c <= max_channels:
        return a
    k = -(-c // max_channels)
    pad = k * (-(-c // k)) - c
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    return a.reshape(*a.shape[:-1], -1, k).amax(-1)


@dataclass
class _Reservoir:
    """Uniform sample without replacement over a stream of rows, via random priority keys (top-k keeps)."""

    cap: int
    keys: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, gen: torch.Generator, flags: torch.Tensor | None = None) -> None:
        """Offer rows [N, C]; `flags` [N] (e.g. is-sink) is appended as a last column to the kept rows."""
        keys = torch.rand(rows.shape[0], generator=gen)
        if self.keys.numel() >= self.cap:  # only rows that beat the weakest kept key can enter
            keep = keys > self.keys.min()
            keys, rows = keys[keep], rows[keep]
            flags = flags[keep] if flags is not None else None
        if flags is not None:
            rows = torch.cat([rows, flags.float().unsqueeze(1)], 1)
        all_keys = torch.cat([self.keys, keys])
        all_rows = rows if self.rows is None else torch.cat([self.rows, rows])
        if all_keys.numel() > self.cap:
            idx = all_keys.topk(self.cap).indices
            all_keys, all_rows = all_keys[idx], all_rows[idx]
        self.keys, self.rows = all_keys, all_rows


class SiteAccumulator:
    """Everything SpinScope keeps about one activation site of one layer, updated one window batch at a time."""

    def __init__(self, channels: int, seed: int = 0, sqnr_bits: tuple = ()):
        self.c = channels
        # per-token asymmetric RTN error at these bit widths: bits -> [signal power, noise power] (sink excluded)
        self.sqnr = {b: [0.0, 0.0] for b in sqnr_bits}
        self.body = empty_moments(channels)  # tokens at positions >= 1
        self.sink = empty_moments(channels)  # tokens at position 0 of each window
        self.absmax_body = torch.zeros(channels, dtype=torch.float64)
        self.absmax_sink = torch.zeros(channels, dtype=torch.float64)
        self.tk_sum = {"body": 0.0, "sink": 0.0}
        self.tk_max = {"body": 0.0, "sink": 0.0}
        self.tk_n = {"body": 0, "sink": 0}
        self.top = torch.empty(0, 5, dtype=torch.float64)  # rows: norm, absmax, window, position, token id
        self.norm_sum = {"body": 0.0, "sink": 0.0}
        self.norms = _Reservoir(NORM_SAMPLE)
        self.samples = _Reservoir(SAMPLE_ROWS)  # rows [C+1]: last column 1.0 if sink
        self.surface: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def update(
        self, x: torch.Tensor, token_ids: torch.Tensor, window_index: int, rows: torch.Tensor | None = None
    ) -> None:
        """x [B, T, C] activations of B windows starting at window_index; token_ids [B, T]. Or x [N, C] for some
        of those tokens only (e.g. the ones routed to one expert), rows [N] their flat indices into [B, T]."""
        # These reductions are small and memory-bound: on a busy 2-core machine, intra-op threads cost 10x more
        # than they save (measured), so run them on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._update(x, token_ids, window_index, rows)
        finally:
            torch.set_num_threads(threads)

    def _update(
        self, x: torch.Tensor, token_ids: torch.Tensor, window_index: int, rows: torch.Tensor | None = None
    ) -> None:
        x = x.detach().float().cpu()
        t = token_ids.shape[-1]
        flat = x.reshape(-1, x.shape[-1])
        rows = torch.arange(flat.shape[0]) if rows is None else rows.cpu()  # flat index into [B, T] per row
        is_sink = rows % t == 0
        sink, body = flat[is_sink], flat[~is_sink]
        if sink.shape[0]:  # an expert may receive no window's first token
            self.sink = self.sink.merge(Moments.of(sink))
            self.absmax_sink = torch.maximum(self.absmax_sink, _absmax0(sink))
        if body.shape[0]:
            self.body = self.body.merge(Moments.of(body))
            self.absmax_body = torch.maximum(self.absmax_body, _absmax0(body))
        kurt, norms = token_moments(flat)
        for part, sel in (("sink", is_sink), ("body", ~is_sink)):
            k = kurt[sel]
            if k.numel():
                self.tk_sum[part] += float(k.sum())
                self.tk_max[part] = max(self.tk_max[part], float(k.max()))
                self.tk_n[part] += k.numel()
                self.norm_sum[part] += float(norms[sel].sum())
        self.norms.add(norms[~is_sink].unsqueeze(1), self.gen)
        # Largest-norm tokens: pick candidates by norm first, then read their absmax and identity.
        top = norms.topk(min(TOP_TOKENS, norms.numel())).indices
        cand = torch.stack(
            [
                norms[top].double(),
                flat[top].abs().amax(1).double(),
                (rows[top] // t + window_index).double(),
                (rows[top] % t).double(),
                token_ids.reshape(-1)[rows[top]].double(),
            ],
            1,
        )
        cand = torch.cat([self.top, cand])
        self.top = cand[cand[:, 0].topk(min(TOP_TOKENS, cand.shape[0])).indices]
        self.samples.add(flat, self.gen, flags=is_sink)
        if self.sqnr and body.numel():
            power = float(body.square().sum())
            for bits, acc in self.sqnr.items():
                acc[0] += power
                acc[1] += float((body - quantize_activation(body, bits)).square().sum())
        first = flat[rows < t][:SURFACE_TOKENS]  # the first window's tokens (an expert's: those routed to it)
        if self.surface is None and first.shape[0]:
            self.surface = pool_channels(first.abs()).to(torch.bfloat16)

    # ---- summaries -------------------------------------------------------------------------------------------
    def moments(self, include_sink: bool) -> Moments:
        return self.body.merge(self.sink) if include_sink else self.body

    def scalars(self) -> dict[str, float]:
        """The per-layer table row for this site."""
        out: dict[str, float] = {"tokens": self.tk_n["body"] + self.tk_n["sink"]}  # an expert's: those routed to it
        for tag, inc in (("", True), ("_nosink", False)):
            _, _, var, kurt = self.moments(inc).pooled()
            out[f"kurt_tensor{tag}"] = kurt
            out[f"var{tag}"] = var
            n = self.tk_n["body"] + (self.tk_n["sink"] if inc else 0)
            s = self.tk_sum["body"] + (self.tk_sum["sink"] if inc else 0.0)
            out[f"kurt_token_mean{tag}"] = s / n if n else float("nan")
            out[f"kurt_token_max{tag}"] = max(self.tk_max["body"], self.tk_max["sink"] if inc else 0.0)
            am = torch.maximum(self.absmax_body, self.absmax_sink) if inc else self.absmax_body
            out[f"absmax{tag}"] = float(am.max())
        med = float(self.norms.rows.median()) if self.norms.rows is not None and self.norms.rows.numel() else 0.0
        out["median_token_norm"] = med
        out["max_token_norm"] = float(self.top[0, 0]) if self.top.numel() else 0.0
        out["sink_norm_mean"] = self.norm_sum["sink"] / max(self.tk_n["sink"], 1)
        out["massive_ratio"] = out["max_token_norm"] / med if med > 0 else float("nan")
        for bits, (signal, noise) in self.sqnr.items():
            out[f"sqnr{bits}"] = 10 * math.log10(signal / noise) if noise > 0 else float("inf")
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Per-channel and sampled arrays for plots and the cache."""
        allm = self.moments(True)
        return {
            "absmax": torch.maximum(self.absmax_body, self.absmax_sink).float(),
            "absmax_nosink": self.absmax_body.float(),
            "mean": allm.mean.float(),
            "var": allm.variance().float(),
            "var_nosink": self.body.variance().float(),
            "kurt_channel": allm.kurtosis().float(),
            "top_tokens": self.top.float(),
            "samples": (self.samples.rows if self.samples.rows is not None else torch.zeros(0, self.c + 1)).float(),
            "surface": self.surface if self.surface is not None else torch.zeros(0, 0, dtype=torch.bfloat16),
        }
