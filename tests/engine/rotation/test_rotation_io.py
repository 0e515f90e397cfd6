"""SpinQuant's rotation file layout: what its code writes loads here and fuses as its ptq.py does; our files round
trip to identical logits; low-precision files are repaired on import; malformed files give clear errors."""

import pytest
import torch

from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.rotation.files import (
    RotationSet,
    dense,
    export_spinquant,
    import_spinquant,
    load_rotations,
    r2_key,
    r3_key,
    r4_key,
    save_rotations,
)
from engine.rotation.fusion import RotationConfig, fold_norms, fuse_r1, fuse_r2, rotate
from engine.rotation.hadamard import random_hadamard, random_orthogonal
from engine.rotation.orthogonal import orthogonality_error

LAYERS, HIDDEN, HEADS, KV, INTER = 2, 32, 4, 2, 64
HD = HIDDEN // HEADS


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(seed=1, layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV, intermediate=INTER, vocab=96)
    return m, resolve(m)


def ids():
    return torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(ids(), use_cache=False).logits


def spinquant_dict(seed=0) -> dict:
    """What SpinQuant's optimize_rotation.py saves: state-dict keys with '.weight' stripped, float32."""
    out = {"R1": random_orthogonal(HIDDEN, seed=seed).float()}
    out.update(
        {f"model.layers.{i}.self_attn.R2": random_orthogonal(HD, seed=seed + 1 + i).float() for i in range(LAYERS)}
    )
    return out


def flrot_set(seed=0) -> RotationSet:
    r4 = [
        torch.stack([random_orthogonal(16, seed=seed + 50 + 4 * i + j) for j in range(INTER // 16)]).float()
        for i in range(LAYERS)
    ]
    r2 = [random_orthogonal(HD, seed=seed + 10 + i).float() for i in range(LAYERS)]
    r3 = [random_hadamard(HD, seed=seed + 20 + i).float() for i in range(LAYERS)]
    return RotationSet(random_hadamard(HIDDEN, seed=seed).float(), r2, r3, r4)


def test_a_spinquant_file_fuses_as_spinquant_does(model, tmp_path):
    m, arch = model
    data = spinquant_dict()
    path = tmp_path / "R.bin"
    torch.save(data, path)
    rs = load_rotations(path, arch)
    assert rs.r3 is None and rs.r4 is None and rs.n_layers == LAYERS
    got = rotate(m, arch, RotationConfig(r1="file", r2="file", file=str(path)))
    # by hand, in SpinQuant's order: fold norms, W R1 / R1^T W everywhere, then R2 on v rows and o columns
    import copy

    ref = copy.deepcopy(m)
    fold_norms(ref, arch)
    fuse_r1(ref, arch, data["R1"])
    for i in range(LAYERS):
        fuse_r2(ref, arch, i, data[r2_key(i)])
    torch.testing.assert_close(logits(got), logits(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(got), logits(m), atol=1e-4, rtol=0)  # and the network is unchanged


def test_export_then_reload_gives_identical_logits(model, tmp_path):
    m, arch = model
    rs = flrot_set()
    first = save_rotations(rs, tmp_path / "a.bin")
    again = save_rotations(load_rotations(first, arch), tmp_path / "b.bin")
    a = rotate(m, arch, rs.rotation_config(first))
    b = rotate(m, arch, load_rotations(again).rotation_config(again))
    assert torch.equal(logits(a), logits(b))
    # R4 stored as dense matrices instead of blocks: the same network
    dense_set = RotationSet(rs.r1, rs.r2, rs.r3, [dense(r) for r in rs.r4])
    c = rotate(m, arch, dense_set.rotation_config(save_rotations(dense_set, tmp_path / "c.bin")))
    assert torch.equal(logits(a), logits(c))
    torch.testing.assert_close(logits(a), logits(m), atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".*tmp")), "the atomic write left a temporary file"


def test_file_layout_and_spinquant_only_export(tmp_path):
    rs = flrot_set()
    path = save_rotations(rs, tmp_path / "flrot.bin")
    data = torch.load(path, weights_only=True)
    assert set(data) == (
        {"R1"}
        | {r2_key(i) for i in range(LAYERS)}
        | {r3_key(i) for i in range(LAYERS)}
        | {r4_key(i) for i in range(LAYERS)}
    )
    assert all(t.dtype == torch.float32 for t in data.values())
    assert data[r4_key(0)].shape == (INTER // 16, 16, 16)
    only = torch.load(export_spinquant(path, tmp_path / "R.bin"), weights_only=True)
    assert set(only) == {"R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"}
    assert torch.equal(only["R1"], rs.r1)
    assert rs.rotation_config(path).r3 == "file"
    assert RotationSet(rs.r1, rs.r2).rotation_config(path).r3 == "hadamard"


def test_a_bfloat16_spinquant_file_is_repaired_on_import(model, tmp_path):
    m, arch = model
    data = {k: v.bfloat16() for k, v in spinquant_dict().items()}
    src = tmp_path / "bf16.bin"
    torch.save(data, src)
    assert orthogonality_error(data["R1"]) > 1e-3  # engine.rotation.fusion would refuse it as it is
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate(m, arch, RotationConfig(r1="file", r2="file", file=str(src)))
    fixed = load_rotations(import_spinquant(src, tmp_path / "fixed.bin", arch), arch)
    assert orthogonality_error(fixed.r1) < 1e-6
    assert (fixed.r1 - spinquant_dict()["R1"]).abs().max() < 2e-2  # the same rotation, rounding undone
    rotate(m, arch, RotationConfig(r1="file", r2="file", file=str(tmp_path / "fixed.bin")))


def test_malformed_files_give_clear_errors(model, tmp_path):
    m, arch = model
    cases = {
        "no_r1": ({k: v for k, v in spinquant_dict().items() if k != "R1"}, "no 'R1' key"),
        "no_r2": ({"R1": spinquant_dict()["R1"]}, "no 'model.layers.0.self_attn.R2'"),
        "short": ({"R1": spinquant_dict()["R1"], r2_key(0): spinquant_dict()[r2_key(0)]}, "R2 for 1 layers"),
        "shape": ({**spinquant_dict(), "R1": random_orthogonal(16).float()}, r"R1 is \(16, 16\)"),
        "skewed": ({**spinquant_dict(), r2_key(1): torch.eye(HD) * 1.1}, "R2 of layer 1 is not orthogonal"),
        "partial_r3": ({**spinquant_dict(), r3_key(0): torch.eye(HD)}, "R3 for only some layers"),
        "r4_tiles": (
            {
                **spinquant_dict(),
                **{r3_key(i): torch.eye(HD) for i in range(LAYERS)},
                **{r4_key(i): torch.eye(16).expand(3, 16, 16).clone() for i in range(LAYERS)},
            },
            "must tile 64",
        ),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.bin"
        torch.save(data, path)
        with pytest.raises(ValueError, match=message):
            load_rotations(path, arch)
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.bin is not a rotation file: expected a torch.save.d dict of tensors"):
        load_rotations(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="R3 has 1 layers but R2 has 2"):
        RotationSet(torch.eye(HIDDEN), [torch.eye(HD)] * 2, [torch.eye(HD)])
