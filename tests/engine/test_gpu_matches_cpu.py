"""The engine computes the same results on a CUDA GPU as on the CPU, on the same code paths, at small shapes:
rotation fusion and its logits check, RTN fake quantization of a whole model with calibrated clips, and GPTQ.

float32 on both devices; the GPU's reductions add in another order, so values agree to float32 rounding, and
the few rounding decisions a quantizer takes on values within rounding of a grid boundary may differ: the
tolerances below allow exactly that much. `make test-gpu` runs them; without a GPU they skip."""

import copy

import pytest
import torch

from engine.events import run_to_end
from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.gptq import gptq_quantize
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig, equivalence, logits, rotate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: compares GPU results with the CPU's on the same code paths (make test-gpu)",
    ),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round matmul inputs to 10 mantissa bits on the GPU only: keep true float32 on both sides."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def ids(n: int = 2, t: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def on(device: str, model):
    return copy.deepcopy(model).to(device)


def test_rotation_fuses_the_same_weights_and_keeps_the_logits_on_both_devices():
    model = tiny_llama(seed=1, hidden=128, intermediate=256, heads=4, kv_heads=2)
    cfg = RotationConfig(r1="hadamard", r2="hadamard", r3="hadamard", r4="hadamard", seed=3)
    x = ids()
    results = {}
    for device in ("cpu", "cuda"):
        m = on(device, model)
        rotated = rotate(m, resolve(m), cfg)
        results[device] = (rotated, equivalence(m, rotated, x))
    cpu, gpu = results["cpu"], results["cuda"]
    for name, w in cpu[0].state_dict().items():  # float64 surgery, cast back: equal to float32 rounding
        torch.testing.assert_close(gpu[0].state_dict()[name].cpu(), w, rtol=1e-5, atol=1e-6, msg=name)
    for check in (cpu[1], gpu[1]):  # an exact rotation in float32 moves the logits by rounding only
        assert check["max_abs_logit_diff"] < 1e-4 * check["max_abs_logit"], check
        assert check["kl"] < 1e-9, check
    torch.testing.assert_close(logits(gpu[0], x), logits(cpu[0], x), rtol=1e-4, atol=1e-4)


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [] if tree is None else [float(tree)]


def test_rtn_with_calibrated_clips_gives_the_same_logits_on_both_devices():
    model = tiny_llama(seed=2, hidden=128, intermediate=256, heads=4, kv_heads=2)
    recipe, bits = get_recipe("quarot", clip="calibrated"), Bits.parse("4-4-4")
    calib, x = ids(4, 64, seed=5), ids(seed=6)
    out, plans = {}, {}
    for device in ("cpu", "cuda"):
        m = on(device, model)
        arch = resolve(m)
        m = rotate(m, arch, recipe.rotation, inplace=True)
        gen = quantize_model(m, arch, bits, recipe, calib)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            plans[device] = stop.value.summary(arch.n_layers)
        out[device] = logits(m, x)
    chosen = {d: _numbers(p) for d, p in plans.items()}  # every clip ratio chosen, in one order
    agree = sum(abs(a - b) < 1e-6 for a, b in zip(chosen["cpu"], chosen["cuda"], strict=True))
    assert agree >= 0.9 * len(chosen["cpu"]), (agree, len(chosen["cpu"]))  # a near-tie may go the other way
    diff = (out["cuda"] - out["cpu"]).abs()
    scale = out["cpu"].abs().max()
    # a 4-bit activation whose value sits within float32 rounding of a grid boundary may round the other way:
    # rare, and small beside the logits' scale
    assert float(diff.mean()) < 1e-3 * float(scale), float(diff.mean())
    assert float(diff.max()) < 5e-2 * float(scale), float(diff.max())


def test_gptq_quantizes_a_linear_the_same_on_both_devices():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) * torch.linspace(0.1, 3.0, 256)  # unequal channels, as real inputs
    h = 2 * x.T @ x / x.shape[0]
    cpu = gptq_quantize(w, h, bits=4)
    gpu = gptq_quantize(w.cuda(), h.cuda(), bits=4).cpu()
    same = (gpu == cpu).float().mean()
    # error feedback carries a flipped rounding to the columns after it, so a flip may change a few more values
    assert same > 0.995, float(same)
    step = w.abs().amax(1, keepdim=True) / 7  # each row's 4-bit grid step (symmetric, absmax / 7)
    assert bool(((gpu - cpu).abs() <= 2 * step + 1e-6).all())  # where they differ, by a step or two


def test_the_whole_eval_build_runs_on_the_gpu_and_agrees_with_the_cpu():
    """engine.evaluate.build_model (the evaluation's own path: rotate, calibrate, quantize) on each device."""
    from engine.evaluate import EvalConfig, build_model
    from engine.model.loading import ModelHandle

    model = tiny_llama(seed=4, hidden=128, intermediate=256, heads=4, kv_heads=2)
    x = ids(seed=7)
    out = {}
    for device in ("cpu", "cuda"):
        m = on(device, model)
        handle = ModelHandle(
            name="tiny",
            model=m,
            tokenizer=None,
            arch=resolve(m),
            fingerprint="tiny",
            note="",
            dtype="float32",
            device=device,
        )
        built, _ = run_to_end(
            build_model(
                handle, copy.deepcopy(m), get_recipe("quarot", clip="fixed"), Bits.parse("4-4-4"), EvalConfig(), seed=0
            )
        )
        out[device] = logits(built, x)
    diff = (out["cuda"] - out["cpu"]).abs()
    assert float(diff.mean()) < 1e-3 * float(out["cpu"].abs().max())
