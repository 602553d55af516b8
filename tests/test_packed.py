"""4-bit checkpoints edited in their own format: MXFP4 (gpt-oss's experts: e2m1 nibbles with
e8m0 scales per 32 inputs, stored transposed) and compressed-tensors INT4 pack-quantized
(Kimi-K2-Thinking's experts: int4 in int32 words, a bf16 scale per group of 32). The codecs
against independent ones (transformers' MXFP4 dequantizer, compressed-tensors' packer), then
whole checkpoints written with the formats' real names, rewritten, verified and loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import expect_error, run_cli, weight_signals
from safetensors.torch import load_file, save_file

from ablation import edits, quant
from ablation.checkpoint import open_index

MXFP4 = quant.detect({"quantization_config": {"quant_method": "mxfp4"}})
INT4_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "strategy": "group",
                "group_size": 32,
                "symmetric": True,
                "dynamic": False,
                "observer": "minmax",
            },
        }
    },
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|down)_proj.*",
    ],
}
INT4 = quant.detect({"quantization_config": INT4_CONFIG})
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


# ---------------------------------------------------------------- reference codecs


def reference_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent MXFP4 quantizer of w [..., out, in]: per 32 inputs a power-of-two
    scale 2^ceil(log2(amax / 6)) stored as its exponent + 127, each value the nearest e2m1
    code by table look-up, two codes a byte (the even one in the low nibble)."""
    *lead, out, inn = w.shape
    groups = w.double().reshape(*lead, out, inn // 32, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    exp = torch.ceil(torch.log2((amax / 6).clamp_min(2.0**-126)))
    table = torch.tensor(E2M1, dtype=torch.float64)
    codes = (groups / torch.exp2(exp)).unsqueeze(-1).sub(table).abs().argmin(dim=-1)
    codes = codes.reshape(*lead, out, inn // 32, 16, 2).to(torch.uint8)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


def reference_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' own symmetric group quantizer and packer: scale amax / 7.5 in
    bf16, values rounded and clamped to -8..7, packed by compressed_tensors.pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out, inn = w.shape
    groups = w.float().reshape(out, inn // group, group)
    scale = (groups.abs().amax(dim=-1) / 7.5).to(torch.bfloat16)
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
    return pack_to_int32(q.reshape(out, inn), 4), scale


# ---------------------------------------------------------------- the codecs


def test_mxfp4_values_match_transformers_dequantizer():
    """Our MXFP4 values of random blocks and scales are transformers' (which returns the
    parameter as gpt-oss applies it, [E, in, out]: ours transposed), bit for bit."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(110, 140, (3, 40, 2), generator=g, dtype=torch.int32).to(torch.uint8)
    ours = quant.values(MXFP4, blocks, scales, (1, 32), torch.float32)
    assert ours.shape == (3, 40, 64)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(ours.transpose(1, 2), want)
    assert torch.equal(MXFP4.pack(MXFP4.unpack(blocks), blocks), blocks)


def test_int4_packing_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (24, 64), generator=g, dtype=torch.int32).to(torch.int8)
    packed = pack_to_int32(codes, 4)
    assert torch.equal(INT4.unpack(packed), codes)
    assert torch.equal(INT4.pack(codes, packed), packed)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([24, 64])), codes)


@pytest.mark.parametrize("grid", [quant.E2M1, quant.INT4], ids=lambda g: g.name)
def test_bracket_is_the_grid(grid):
    """The two grid values around t, from the grid's shape, equal a look-up in the list of
    every value, on random values, on the grid and on the midpoints."""
    table = (
        torch.tensor(sorted(set(E2M1)), dtype=torch.float64)
        if grid.name == "e2m1"
        else torch.arange(-8, 8, dtype=torch.float64)
    )
    g = torch.Generator().manual_seed(2)
    t = torch.cat([torch.randn(5000, generator=g) * 4, table, (table[1:] + table[:-1]) / 2])
    t = t.double()
    c = t.clamp(table[0], table[-1])
    lo = table[torch.searchsorted(table, c, right=True) - 1]
    hi = table[torch.searchsorted(table, c).clamp_max(len(table) - 1)]
    got_lo, got_hi = grid.bracket(t)
    assert torch.equal(got_lo, lo) and torch.equal(got_hi, hi)


@pytest.mark.parametrize(
    "scheme, scale_dtype", [(MXFP4, torch.float32), (INT4, torch.bfloat16)], ids=["mxfp4", "int4"]
)
def test_codec_is_its_own_fixed_point(scheme, scale_dtype):
    w = torch.randn(4, 48, 96, generator=torch.Generator().manual_seed(3)) * 0.02
    like = torch.zeros(4, 48, 3, dtype=scale_dtype)
    q, s = quant.quantize(w, like, (1, 32), scheme.ue8m0, scheme.grid)
    y = quant.dequantize(q, s, (1, 32), torch.float64, scheme.grid)
    q2, s2 = quant.quantize(y, s, (1, 32), scheme.ue8m0, scheme.grid)
    assert torch.equal(quant.dequantize(q2, s2, (1, 32), torch.float64, scheme.grid), y)
    assert (y.abs() - w.abs()).abs().max() <= s.float().max()  # within a grid step


@pytest.mark.parametrize("scheme", [MXFP4, INT4], ids=["mxfp4", "int4"])
@pytest.mark.parametrize("axis", [1, 2])
def test_edit_stays_on_the_grid_around_the_float_edit(scheme, axis):
    """Every stored value is one of the two grid values around the float edit, and the
    rounding chosen leaves far less of r than round-to-nearest (at a real hidden size, less
    than bf16 would)."""
    g = torch.Generator().manual_seed(4)
    hidden = 512
    shape = (2, hidden, 256) if axis == 1 else (2, 256, hidden)
    w = torch.randn(shape, generator=g) * 0.02
    like = torch.zeros(*shape[:-1], shape[-1] // 32, dtype=torch.bfloat16)
    q, s = quant.quantize(w, like, (1, 32), scheme.ue8m0, scheme.grid)
    stored = scheme.pack(q, torch.empty(_stored_shape(scheme, shape), dtype=_word(scheme)))
    r = torch.randn(hidden, generator=g, dtype=torch.float64)
    r /= r.norm()
    spec = edits.EditSpec(1.0, True)
    new, s1, res = quant.edit_stored(scheme, stored, s, (1, 32), r.float(), axis, spec)
    assert new.dtype == stored.dtype and new.shape == stored.shape and s1.dtype == s.dtype
    want = edits.project_out(
        quant.values(scheme, stored, s, (1, 32), torch.float64),
        r,
        axis,
        edits.EditSpec(1.0, True, torch.float64),
    )
    per = quant.per_element(scheme.scale_values(s1), (1, 32), torch.Size(shape))
    lo, hi = scheme.grid.bracket(want / per)
    got = scheme.grid.decode(scheme.unpack(new), torch.float64)
    assert ((got >= lo - 1e-6) & (got <= hi + 1e-6)).all()
    assert res.stored < res.rtn / 10, res
    assert res.stored <= 2 * res.bf16, res  # the bar set for float8
    _, rel = edits.projection_residue(quant.values(scheme, new, s1, (1, 32)), r.float(), axis)
    assert rel == pytest.approx(res.stored, rel=1e-3)


@pytest.mark.parametrize("axis", [0, 1])
def test_int4_at_kimi_k2_hidden_size(axis):
    """Vectors as long as Kimi-K2's hidden size (7168): the coarse integer grid leaves a
    large leftover after the shifted roundings on some vectors, which the error feedback must
    still cancel (it once stalled when every single flip was under leftover / candidates)."""
    g = torch.Generator().manual_seed(5)
    shape = (7168, 64) if axis == 0 else (64, 7168)
    w = torch.randn(shape, generator=g) * 0.02
    like = torch.zeros(shape[0], shape[1] // 32, dtype=torch.bfloat16)
    q, s = quant.quantize(w, like, (1, 32), False, quant.INT4)
    r = unit(7168, seed=6)
    _, _, res = quant.edit(q, s, (1, 32), False, r, axis, edits.EditSpec(1.0, True), quant.INT4)
    assert res.stored <= 2 * res.bf16, res
    assert res.stored < res.rtn / 50, res


def _word(scheme: quant.Scheme) -> torch.dtype:
    return torch.uint8 if scheme is MXFP4 else torch.int32


def _stored_shape(scheme: quant.Scheme, shape: tuple[int, ...]) -> tuple[int, ...]:
    if scheme is MXFP4:
        return (*shape[:-1], shape[-1] // 32, 16)
    return (*shape[:-1], shape[-1] // 8)


# ---------------------------------------------------------------- gpt-oss in MXFP4

GPT_OSS = dict(hidden_size=64, intermediate_size=64)  # down_proj square: the table decides
EXPERTS = ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")


def make_mxfp4(src: Path, dst: Path) -> Path:
    """gpt-oss as released: every fused expert projection as *_blocks [E, out, in/32, 16] and
    *_scales [E, out, in/32] (the parameter [E, in, out] transposed), the rest as it was."""
    return _convert(src, dst, {"quant_method": "mxfp4", "modules_to_not_convert": []}, _to_mxfp4)


def _to_mxfp4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.endswith(EXPERTS):
            out[name + "_blocks"], out[name + "_scales"] = reference_mxfp4(t.transpose(1, 2))
        else:
            out[name] = t
    return out


def _from_mxfp4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            values = quant.values(MXFP4, t, tensors[base + "_scales"], (1, 32))
            out[base] = values.transpose(1, 2).contiguous()
        else:
            out[name] = t
    return out


def _convert(src: Path, dst: Path, qconfig: dict | None, fn) -> Path:
    """A copy of a checkpoint with each shard's tensors passed through fn (a weight and its
    companions stay in its shard)."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = fn(load_file(src / shard))
        save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    if qconfig:
        config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():
        if not (dst / extra.name).exists():
            shutil.copy(extra, dst / extra.name)
    return dst


def make_dense_mxfp4(src: Path, dst: Path) -> Path:
    """The float model an MXFP4 checkpoint stands for."""
    return _convert(src, dst, None, _from_mxfp4)


def tensors_of(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in open_index(root).shards:
        out.update(load_file(root / shard))
    return out


def headers(root: Path) -> dict[str, tuple]:
    return {n: (i.dtype, i.shape, i.shard) for n, i in open_index(root).tensors.items()}


def logits_of(model_dir: Path, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, dict]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    with torch.no_grad():
        return model(ids).logits.double(), dict(model.named_parameters())


def _same_edit_on(tmp_path: Path, orders: Path, model: Path, name: str) -> Path:
    """The same orders (same .refuse) written for another model, output beside."""
    other = tmp_path / f"{name}.yaml"
    text = orders.read_text().replace(str(tmp_path / "out"), str(tmp_path / f"out-{name}"))
    model_line = next(line for line in text.splitlines() if line.startswith("model:"))
    other.write_text(text.replace(model_line, f"model: {model}"))
    return other


def ablate_and_verify(
    orders: Path, model: Path, out: Path, says: str, scheme: quant.Scheme
) -> tuple[dict, list, dict, dict]:
    """Rewrite and verify; check every name, dtype and shape is the input's and every tensor
    but the edited ones and their scales byte-identical. Returns the output's record, its
    quantized edits (the experts, writers and readers) and the tensors before and after."""
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    assert says in res.output
    assert headers(out) == headers(model)
    res = run_cli("verify", out, "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((out / "ablation.json").read_text())
    packed = [e for e in record["edits"] if "quantized" in e]
    assert {e["role"] for e in packed} == {"expert_out", "expert_in"}
    edited = {e["tensor"] for e in record["edits"]}
    scales = {scheme.scale_name(scheme.weight_name(e["tensor"])) for e in packed}
    before, after = tensors_of(model), tensors_of(out)
    for name, t in before.items():
        if name not in edited | scales:
            assert torch.equal(t, after[name]), name
    return record, packed, before, after


def test_mxfp4_checkpoint_rewrite_and_transformers_load(tmp_path, checkpoint, job):
    """gpt-oss with MXFP4 experts (the down projection square, so only the table's input
    axis says which of its axes is hidden): the output keeps every name, dtype and shape,
    verifies on the e2m1 grid, leaves every other tensor byte-identical, and transformers
    (MXFP4 dequantized on CPU) loads it with our values and with logits of the same edit
    applied to the dequantized model, within twice the noise of round-to-nearest MXFP4."""
    from transformers import Mxfp4Config

    src = checkpoint("gpt_oss", **GPT_OSS)
    model = make_mxfp4(src, tmp_path / "mxfp4")
    dense = make_dense_mxfp4(model, tmp_path / "dense")
    orders = job(model, refuse_kw={"hidden": 64}, components=["writers", "experts_in"])
    out = tmp_path / "out"
    record, packed, _, after = ablate_and_verify(orders, model, out, "quantized  expert_out", MXFP4)
    assert {e["tensor"].rsplit(".", 1)[-1] for e in packed} == {
        "down_proj_blocks",
        "gate_up_proj_blocks",
    }
    assert record["quantized"]["format"] == "mxfp4"

    # the same orders on the dequantized model, and that edit rounded to nearest MXFP4
    assert run_cli("ablate", _same_edit_on(tmp_path, orders, dense, "dense")).exit_code == 0
    rtn = make_dense_mxfp4(make_mxfp4(tmp_path / "out-dense", tmp_path / "rtn4"), tmp_path / "rtn")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    got, params = logits_of(out, ids, quantization_config=Mxfp4Config(dequantize=True))
    want, _ = logits_of(tmp_path / "out-dense", ids)
    floor, _ = logits_of(rtn, ids)
    base, _ = logits_of(dense, ids)
    name = "model.layers.1.mlp.experts.down_proj"
    ours = quant.values(MXFP4, after[name + "_blocks"], after[name + "_scales"], (1, 32))
    assert torch.equal(params[name].detach(), ours.transpose(1, 2))
    noise = (got - want).abs().max().item()
    rtn_noise = (floor - want).abs().max().item()
    effect = (want - base).abs().max().item()
    print(f"logits: edit {effect:.2e}; mxfp4 output vs dense edit {noise:.2e}; rtn {rtn_noise:.2e}")
    assert noise <= 2 * rtn_noise


def test_mxfp4_square_down_proj_edited_on_its_hidden_axis(tmp_path, checkpoint, job):
    """The output's down projections, as gpt-oss applies them (x @ W, W [E, inter, hidden]),
    write nothing along r: W r ~ 0 within the e2m1 noise. Editing the other axis (the blocks'
    last axis, as a tool reading the stored layout as the parameter would) leaves W r as it
    was."""
    src = checkpoint("gpt_oss", **GPT_OSS)
    model = make_mxfp4(src, tmp_path / "mxfp4")
    r = unit(64, seed=7)
    orders = job(
        model, refuse_kw={"hidden": 64, "direction": r}, components=["experts"], projected=False
    )
    assert run_cli("ablate", orders).exit_code == 0
    before, after = _from_mxfp4(tensors_of(model)), _from_mxfp4(tensors_of(tmp_path / "out"))
    for layer in range(3):
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        w0, w1 = before[name].double(), after[name].double()  # [E, inter, hidden]
        # [E, inter, hidden] @ [hidden] -> [E, inter]: what each row writes along r
        rel_before = (w0 @ r.double()).abs() / w0.norm(dim=-1)
        rel_after = (w1 @ r.double()).abs() / w1.norm(dim=-1)
        assert rel_after.max() < rel_before.median() / 5, (rel_after.max(), rel_before.median())


def unit(n: int, seed: int) -> torch.Tensor:
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


# ---------------------------------------------------------------- Kimi-K2-Thinking layout in INT4

DEEPSEEK = dict(moe_intermediate_size=64)  # down_proj [32, 64]: two groups of 32 per row


def _is_routed_expert(name: str, t: torch.Tensor) -> bool:
    return ".mlp.experts." in name and name.endswith("_proj.weight") and t.ndim == 2


def _to_int4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if not _is_routed_expert(name, t):
            out[name] = t
            continue
        stem = name.removesuffix(".weight")
        out[stem + ".weight_packed"], out[stem + ".weight_scale"] = reference_int4(t)
        out[stem + ".weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
    return out


def make_int4(src: Path, dst: Path) -> Path:
    return _convert(src, dst, INT4_CONFIG, _to_int4)


def _from_int4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            stem = name.removesuffix(".weight_packed")
            shape = torch.Size(tensors[stem + ".weight_shape"].tolist())
            q = unpack_from_int32(t, 4, shape).float()
            s = tensors[stem + ".weight_scale"].float()
            out[stem + ".weight"] = q * s.repeat_interleave(32, dim=1)
        elif not name.endswith((".weight_scale", ".weight_shape")):
            out[name] = t
    return out


def test_int4_checkpoint_rewrite(tmp_path, checkpoint, job):
    """DeepSeek-V3 layout with its routed experts in compressed-tensors INT4 (as Kimi-K2-
    Thinking): names, dtypes and shapes kept, verify on the integer grid, weight_shape and
    every other tensor byte-identical; the experts' new values (decoded by compressed-tensors'
    own unpacker) write nothing along r beyond the int4 noise, and the float tensors got the
    very edit the dequantized model gets."""
    src = checkpoint("deepseek_v3", **DEEPSEEK)
    model = make_int4(src, tmp_path / "int4")
    r = unit(32, seed=8)
    orders = job(
        model, refuse_kw={"direction": r}, components=["writers", "readers"], projected=False
    )
    out = tmp_path / "out"
    record, packed, before, after = ablate_and_verify(
        orders, model, out, "compressed-tensors int4 (int4)", INT4
    )
    assert all(e["tensor"].endswith(".weight_packed") for e in packed)
    edited = {e["tensor"] for e in record["edits"]}

    r = r.double()
    dense_before, dense_after = _from_int4(before), _from_int4(after)
    for e in packed:
        if e["role"] != "expert_out":
            continue
        w0 = dense_before[e["tensor"].replace("_packed", "")].double()  # [hidden, inter]
        w1 = dense_after[e["tensor"].replace("_packed", "")].double()
        left = (r @ w1).norm() / w1.norm()  # [hidden] @ [hidden, inter] -> [inter]
        assert left < (r @ w0).norm() / w0.norm() / 3
        assert left == pytest.approx(e["quantized"]["stored"], abs=e["quantized"]["stored"])
    # the float tensors of the same checkpoint edited as the dequantized model's
    dense = _convert(model, tmp_path / "dense", None, _from_int4)
    assert run_cli("ablate", _same_edit_on(tmp_path, orders, dense, "dense")).exit_code == 0
    want = tensors_of(tmp_path / "out-dense")
    for name, t in after.items():
        if name in edited and t.is_floating_point():
            torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-7)


def _rewrite(model: Path, fn) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(model / shard)
        fn(tensors)
        save_file(tensors, model / shard, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update(dict.fromkeys(tensors, shard))
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


DOWN = "model.layers.1.mlp.experts.2.down_proj"


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda t: t.pop(DOWN + ".weight_scale", None),
            f"tensor '{DOWN}.weight_packed' is compressed-tensors int4 (int4) without its scale",
        ),
        (
            lambda t: (
                t.update({DOWN + ".weight_scale": torch.ones(32, 3)})
                if DOWN + ".weight_scale" in t
                else None
            ),
            "its scale has shape [32, 3], but [1, 32] blocks need [32, 2]",
        ),
    ],
    ids=["no-scale", "scale-shape"],
)
def test_int4_broken_companions(tmp_path, checkpoint, job, damage, message):
    model = make_int4(checkpoint("deepseek_v3", **DEEPSEEK), tmp_path / "int4")
    _rewrite(model, damage)
    expect_error(tmp_path, job(model), message)


def test_mxfp4_blocks_without_scales(tmp_path, checkpoint, job):
    model = make_mxfp4(checkpoint("gpt_oss", **GPT_OSS), tmp_path / "mxfp4")
    name = "model.layers.0.mlp.experts.down_proj"
    _rewrite(model, lambda t: t.pop(name + "_scales", None))
    expect_error(
        tmp_path,
        job(model, refuse_kw={"hidden": 64}),
        f"tensor '{name}_blocks' is mxfp4 (e2m1) without its scale '{name}_scales'",
    )


def test_mxfp4_blocks_without_a_quantization_config(tmp_path, checkpoint, job):
    model = make_mxfp4(checkpoint("gpt_oss", **GPT_OSS), tmp_path / "mxfp4")
    config = json.loads((model / "config.json").read_text())
    del config["quantization_config"]
    (model / "config.json").write_text(json.dumps(config))
    expect_error(
        tmp_path,
        job(model, refuse_kw={"hidden": 64}),
        "is stored quantized (MXFP4 blocks: 'model.layers.0.mlp.experts.down_proj_blocks')",
    )


def test_analyze_reads_mxfp4_weights_as_their_values(tmp_path, checkpoint, job):
    """analyze --weights on the MXFP4 checkpoint scores the dequantized model's writers."""
    src = checkpoint("gpt_oss", **GPT_OSS)
    model = make_mxfp4(src, tmp_path / "mxfp4")
    dense = make_dense_mxfp4(model, tmp_path / "dense")
    job(model, refuse_kw={"hidden": 64})  # writes model.refuse
    signals = weight_signals(tmp_path, {"mxfp4": model, "dense": dense})
    for a, b in zip(signals["mxfp4"], signals["dense"], strict=True):
        assert a["tensor"].removesuffix("_blocks") == b["tensor"]
        assert a["energy_ratio"] == pytest.approx(b["energy_ratio"], rel=1e-5)
