"""Float8 checkpoints edited in their own format: the codec's math, then whole DeepSeek-layout
checkpoints (block scales, scales in other shards, edge blocks, compressed-tensors per channel)
rewritten, verified, and loaded by transformers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import expect_error, run_cli, weight_signals
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ablation import edits, quant
from ablation.checkpoint import open_index

E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
FINITE = E4M3[~E4M3.isnan()].unique()  # every finite e4m3 value, sorted


def reference_quantize(w: torch.Tensor, block, scale_dtype=torch.float32, ue8m0: bool = False):
    """An independent block quantizer, as the releases' own scripts write them: per block
    absmax / 448 (rounded up to a power of two for ue8m0), values rounded to nearest e4m3
    (edge blocks cropped)."""
    rows, cols = w.shape
    R, C = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(R, C, dtype=scale_dtype)
    for i in range(R):
        for j in range(C):
            b = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            scale = b.abs().max() / 448
            if ue8m0:
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            scale = scale.to(scale_dtype)
            s[i, j] = scale
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (
                b / scale.float()
            ).to(torch.float8_e4m3fn)
    return q, s


def reference_dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    out = q.double().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= float(
                s[i, j]
            )
    return out


# ---------------------------------------------------------------- the codec


@pytest.mark.parametrize("shape", [(256, 384), (200, 72), (31, 130)])
@pytest.mark.parametrize("block", [(128, 128), (16, 16)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_an_independent_codec_and_is_a_fixed_point(shape, block, scale_dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    q, s = reference_quantize(w, block, scale_dtype)
    assert torch.equal(
        quant.dequantize(q, s, block, torch.float64), reference_dequantize(q, s, block)
    )
    y = quant.dequantize(*quant.quantize(w, s, block), block, torch.float64)
    q2, s2 = quant.quantize(y, s, block)
    assert torch.equal(quant.dequantize(q2, s2, block, torch.float64), y)
    assert q2.dtype == torch.float8_e4m3fn and s2.dtype == scale_dtype and s2.shape == s.shape


def test_ue8m0_scales_stay_powers_of_two():
    w = torch.randn(256, 256) * 0.02
    q, s = quant.quantize(w, torch.zeros(2, 2), (128, 128), ue8m0=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    y = quant.dequantize(q, s, (128, 128), torch.float64)
    assert torch.equal(
        quant.dequantize(*quant.quantize(y, s, (128, 128), True), (128, 128), torch.float64), y
    )


def reference_bracket(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 values just below and above t, looked up in the table of every finite value
    (t beyond +-448: +-448 both)."""
    t = t.double().clamp(-448, 448)
    table = FINITE.double()
    lo = table[torch.searchsorted(table, t, right=True) - 1]
    hi = table[torch.searchsorted(table, t).clamp_max(len(table) - 1)]
    return lo, hi


def test_grid_bracket_is_the_e4m3_grid():
    """The bracket the rewriter and verify use (from the grid's shape, no float8 conversions)
    equals a lookup in the table of all 253 finite e4m3 values, on random values of every
    magnitude, on every grid value and on the midpoints between them."""
    g = torch.Generator().manual_seed(3)
    mids = (FINITE[1:] + FINITE[:-1]) / 2
    t = torch.cat(
        [
            torch.randn(20000, generator=g)
            * torch.exp2(torch.randint(-12, 10, (20000,), generator=g)),
            FINITE,
            mids,
            torch.tensor([500.0, -1000.0, 0.0]),
        ]
    )
    got = torch.stack(quant.grid_bracket(t)).double()
    assert torch.equal(got, torch.stack(reference_bracket(t)))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("block", [(128, 128), (1, 384)])
def test_edit_stays_on_the_grid_around_the_float_edit(axis, block):
    """Every stored value is one of the two e4m3 values around the float edit (the bound the
    verifier uses), and what is left along r is within 2x of what bf16 would leave."""
    g = torch.Generator().manual_seed(1)
    hidden = 512
    shape = (hidden, 384) if axis == 0 else (384, hidden)
    blk = block if block[0] != 1 else (1, shape[1])  # per channel: one scale per row
    w = torch.randn(shape, generator=g) * 0.02
    like = torch.zeros(math.ceil(shape[0] / blk[0]), math.ceil(shape[1] / blk[1]))
    q, s = quant.quantize(w, like, blk)
    r = torch.randn(hidden, generator=g)
    r /= r.norm()
    spec = edits.EditSpec(1.0, True)
    q1, s1, res = quant.edit(q, s, blk, False, r, axis, spec)
    want = edits.project_out(
        quant.dequantize(q, s, blk, torch.float64),
        r,
        axis,
        spec.__class__(1.0, True, torch.float64),
    )
    per = quant.per_element(s1, blk, q1.shape)
    lo, hi = reference_bracket(want / per)
    got = q1.float().double()
    assert ((got >= lo.double() - 1e-9) & (got <= hi.double() + 1e-9)).all()
    assert res.rtn > 10 * res.bf16  # plain rounding puts the direction back
    assert res.stored <= 2 * res.bf16, res
    _, rel = edits.projection_residue(quant.dequantize(q1, s1, blk), r, axis)
    assert rel == pytest.approx(res.stored, rel=1e-3)


def test_blocks_the_edit_leaves_alone_keep_their_bytes():
    """A direction that lives on the first 128 hidden units changes (standard edit) only the
    blocks over those units: every other block keeps its codes and scale."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 512, generator=g) * 0.02  # a reader [out, hidden]
    q, s = quant.quantize(w, torch.zeros(2, 4), (128, 128))
    r = torch.zeros(512)
    r[:128] = torch.randn(128, generator=g)
    r /= r.norm()
    q1, s1, _ = quant.edit(q, s, (128, 128), False, r, 1, edits.EditSpec(1.0, False))
    assert torch.equal(q1.view(torch.uint8)[:, 128:], q.view(torch.uint8)[:, 128:])
    assert torch.equal(s1[:, 1:], s[:, 1:])
    assert not torch.equal(q1.view(torch.uint8)[:, :128], q.view(torch.uint8)[:, :128])


# ---------------------------------------------------------------- whole checkpoints

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


def is_quantized(name: str, t: torch.Tensor) -> bool:
    """What the DeepSeek-V3 release stores in float8: the projections (not the router, norms,
    embeddings or lm_head)."""
    return t.ndim == 2 and name.endswith("_proj.weight")


def make_fp8(
    src: Path,
    dst: Path,
    block: tuple[int, int] | str,
    *,
    scale_suffix: str = ".weight_scale_inv",
    qconfig: dict | None = None,
    scales_apart: tuple[str, ...] = (),
    dense: tuple[str, ...] = (),
) -> Path:
    """A float8 copy of a checkpoint written by the reference quantizer, shard for shard;
    the scales of the weights named in `scales_apart` go to a shard of their own."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = {}
    apart: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in load_file(src / shard).items():
            if not is_quantized(name, t) or any(k in name for k in dense):
                out[name] = t  # left in bf16/f32, as modules_to_not_convert lists them
                continue
            grid_block = {"channel": (1, t.shape[1]), "tensor": tuple(t.shape)}.get(block, block)
            ue8m0 = (qconfig or {}).get("scale_fmt") == "ue8m0"
            q, s = reference_quantize(t, grid_block, ue8m0=ue8m0)
            if block == "tensor":
                s = s.reshape(1)
            out[name] = q
            scale_name = name.removesuffix(".weight") + scale_suffix
            (apart if name in scales_apart else out)[scale_name] = s
        save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    if apart:
        save_file(apart, dst / "model-scales.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(apart, "model-scales.safetensors"))
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig or {**FP8_CONFIG, "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():
        if not (dst / extra.name).exists():
            shutil.copy(extra, dst / extra.name)
    return dst


def make_dequantized(src: Path, dst: Path, block) -> Path:
    """The float model the float8 one stands for (what transformers' dequantize=True loads)."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        out = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                s = load_file(src / index["weight_map"][name + "_scale_inv"])[name + "_scale_inv"]
                t = reference_dequantize(t, s, block).float()
            out[name] = t
        if out:
            save_file(out, dst / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, shard))
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():
        if not (dst / extra.name).exists():
            shutil.copy(extra, dst / extra.name)
    return dst


def headers(root: Path) -> dict[str, tuple]:
    out = {}
    for name, info in open_index(root).tensors.items():
        out[name] = (info.dtype, info.shape, info.shard)
    return out


def tensors_of(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in open_index(root).shards:
        out.update(load_file(root / shard))
    return out


APART = ("model.layers.2.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight")


@pytest.mark.parametrize("block", [(8, 8), (128, 128)])
def test_fp8_checkpoint_rewrite(tmp_path, checkpoint, job, block):
    """DeepSeek layout in float8 with block scales (edge blocks when 128: every tensor is one
    partial block), two scales in a shard of their own: every edited weight dequantizes to the
    grid around the float edit (verify), residues within 2x of bf16's, everything else
    byte-identical, dtypes and shapes as in the input."""
    model = make_fp8(checkpoint("deepseek_v3"), tmp_path / "fp8", block, scales_apart=APART)
    orders = job(model, components=["writers", "readers", "router"])
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    out = tmp_path / "out"
    assert headers(out) == headers(model)
    res = run_cli("verify", out, "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((out / "ablation.json").read_text())
    fp8 = [e for e in record["edits"] if "quantized" in e]
    assert {e["role"] for e in fp8} >= {"attn_out", "expert_out", "shared_expert_out", "attn_in"}
    for e in fp8:
        residue = e["quantized"]
        if ":in:" not in e["direction"]:  # the writers, where the error feedback acts
            assert residue["stored"] <= 2 * residue["bf16"], e
    edited = {e["tensor"] for e in record["edits"]}
    scales = {n.removesuffix(".weight") + ".weight_scale_inv" for n in edited}
    before, after = tensors_of(model), tensors_of(out)
    for name, t in before.items():
        if name not in edited | scales:
            assert torch.equal(
                t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                after[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else after[name],
            ), name
    for name in APART:  # the scale written into its own shard changed with its weight
        scale = name.removesuffix(".weight") + ".weight_scale_inv"
        assert not torch.equal(before[scale], after[scale])
    assert record["quantized"]["format"] == "fp8"


def logits_of(model_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits.double(), dict(model.named_parameters())


def test_transformers_loads_the_fp8_output(tmp_path, checkpoint, job):
    """transformers' finegrained-FP8 integration (dequantized on CPU) reads our output as we
    mean it: its weights are our dequantized ones, and its logits are those of the same edit
    applied to the dequantized model, within the float8 noise of the edited weights."""
    block = (8, 8)
    fp8 = make_fp8(checkpoint("deepseek_v3"), tmp_path / "fp8", block)
    dense = make_dequantized(fp8, tmp_path / "dense", block)
    orders = job(fp8, components=["writers"])
    assert run_cli("ablate", orders).exit_code == 0
    dense_orders = tmp_path / "dense.yaml"
    dense_orders.write_text(
        orders.read_text()
        .replace(str(fp8), str(dense))
        .replace(str(tmp_path / "out"), str(tmp_path / "out-dense"))
    )
    assert run_cli("ablate", dense_orders).exit_code == 0
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    got, params = logits_of(tmp_path / "out", ids)
    want, _ = logits_of(tmp_path / "out-dense", ids)
    base, _ = logits_of(dense, ids)
    name = "model.layers.2.self_attn.o_proj.weight"
    with safe_open(tmp_path / "out" / open_index(tmp_path / "out").tensors[name].shard, "pt") as f:
        q, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    assert torch.equal(params[name].detach(), quant.dequantize(q, s, block))
    # the floor: the dense edit rounded to nearest on float8 block grids, as any float8
    # release of the edited model would be; ours moves an element at most one grid step
    # (round-to-nearest: half a step), so its logits are within twice that noise
    rounded = make_dequantized(
        make_fp8(tmp_path / "out-dense", tmp_path / "rtn8", block), tmp_path / "rtn", block
    )
    floor, _ = logits_of(rounded, ids)
    noise = (got - want).abs().max().item()
    rtn_noise = (floor - want).abs().max().item()
    effect = (want - base).abs().max().item()
    print(f"logits: edit {effect:.2e}; fp8 output vs dense edit {noise:.2e}; rtn {rtn_noise:.2e}")
    assert noise <= 2 * rtn_noise


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8(tmp_path, checkpoint, job, strategy):
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy},
            }
        },
        "ignore": ["lm_head"],
    }
    model = make_fp8(
        checkpoint("llama"),
        tmp_path / "fp8",
        strategy,
        scale_suffix=".weight_scale",
        qconfig=qconfig,
    )
    orders = job(model, components=["writers", "readers"])
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    assert "quantized  attn_out" in res.output
    assert headers(tmp_path / "out") == headers(model)
    res = run_cli("verify", tmp_path / "out", "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert record["quantized"]["format"] == "compressed-tensors"
    assert set(record["quantized"]["residue_by_role"]) >= {"attn_out", "mlp_out", "attn_in"}


# ---------------------------------------------------------------- what is refused


def fp8_model(tmp_path: Path, checkpoint) -> Path:
    return make_fp8(checkpoint("deepseek_v3"), tmp_path / "fp8", (8, 8))


def rewrite_one(model: Path, name: str, fn) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {
        k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name
    }
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def test_fp8_weight_without_its_scale(tmp_path, checkpoint, job):
    model = fp8_model(tmp_path, checkpoint)
    rewrite_one(model, O_PROJ + "_scale_inv", lambda t: t.pop(O_PROJ + "_scale_inv"))
    expect_error(tmp_path, job(model), f"tensor {O_PROJ!r} is fp8 (e4m3) without its scale")


def test_fp8_scale_of_the_wrong_shape(tmp_path, checkpoint, job):
    model = fp8_model(tmp_path, checkpoint)
    rewrite_one(
        model, O_PROJ + "_scale_inv", lambda t: t.update({O_PROJ + "_scale_inv": torch.ones(3, 3)})
    )
    expect_error(tmp_path, job(model), "its scale has shape [3, 3], but [8, 8] blocks need [4, 4]")


@pytest.mark.parametrize(
    "qconfig, message",
    [
        ({"quant_method": "gptq"}, "quantization 'gptq' cannot be edited in place; supported"),
        ({"quant_method": "bitsandbytes"}, "quantization 'bitsandbytes' cannot be edited in"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fp8 format 'e5m2' is not supported"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}},
            },
            "compressed-tensors int8 weights (pack-quantized) cannot be edited in place",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {
                    "g": {
                        "weights": {
                            "num_bits": 4,
                            "type": "int",
                            "strategy": "group",
                            "group_size": 32,
                            "symmetric": False,
                        }
                    }
                },
            },
            "int4 with zero points (symmetric: false) cannot be edited in place",
        ),
        ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "is not [rows, cols]"),
    ],
)
def test_unsupported_quantization(tmp_path, checkpoint, job, qconfig, message):
    model = fp8_model(tmp_path, checkpoint)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = qconfig
    (model / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, job(model), message)


def test_fp8_without_a_quantization_config(tmp_path, checkpoint, job):
    model = fp8_model(tmp_path, checkpoint)
    config = json.loads((model / "config.json").read_text())
    del config["quantization_config"]
    (model / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, job(model), "but config.json has no quantization_config to say how")


def test_analyze_reads_fp8_weights_as_their_values(tmp_path, checkpoint, job):
    """analyze --weights on the float8 checkpoint gives the weight-side signal of the model it
    stands for (the dequantized one), not of the raw codes."""
    fp8 = make_fp8(checkpoint("deepseek_v3"), tmp_path / "fp8", (8, 8))
    dense = make_dequantized(fp8, tmp_path / "dense", (8, 8))
    job(fp8)  # writes model.refuse
    signals = weight_signals(tmp_path, {"fp8": fp8, "dense": dense})
    for a, b in zip(signals["fp8"], signals["dense"], strict=True):
        assert a["tensor"] == b["tensor"]
        assert a["energy_ratio"] == pytest.approx(b["energy_ratio"], rel=1e-5)


def test_fp8_ue8m0_with_layers_left_dense(tmp_path, checkpoint, job):
    """DeepSeek-V3.1 style: scale_fmt ue8m0 (scales stay powers of two after the edit), and
    modules_to_not_convert: some projections stay float and get the plain edit beside the
    float8 ones."""
    qconfig = {**FP8_CONFIG, "weight_block_size": [8, 8], "scale_fmt": "ue8m0"}
    model = make_fp8(
        checkpoint("deepseek_v3"), tmp_path / "fp8", (8, 8), qconfig=qconfig, dense=("o_proj",)
    )
    orders = job(model, components=["writers"])
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    assert "power-of-two scales" in res.output
    assert run_cli("verify", tmp_path / "out", "--orders", orders).exit_code == 0
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    kinds = {e["role"]: "quantized" in e for e in record["edits"]}
    assert kinds["attn_out"] is False and kinds["expert_out"] is True
    after = tensors_of(tmp_path / "out")
    for name, t in after.items():
        if name.endswith("_scale_inv"):
            assert torch.equal(torch.exp2(torch.log2(t).round()), t), name


@pytest.mark.parametrize("block", [(1, 384), (512, 384), (128, 128)])
def test_blocks_wider_than_a_slab_take_two_passes(monkeypatch, block):
    """A writer whose blocks are wider than the slab budget (per-channel rows of a 405B-size
    down_proj, a per-tensor scale): scales from the whole tensor's absmax in a first pass, the
    same scales as one whole-tensor slab gives, and the result on the grid around the edit."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(512, 384, generator=g) * 0.02  # a writer [hidden, in], vectors are columns
    like = torch.zeros(math.ceil(512 / block[0]), math.ceil(384 / block[1]))
    q, s = quant.quantize(w, like, block)
    r = torch.randn(512, generator=g)
    r /= r.norm()
    spec = edits.EditSpec(1.0, True)
    _, s_whole, _ = quant.edit(q, s, block, False, r, 0, spec)
    monkeypatch.setattr(quant, "SLAB_ELEMENTS", 512 * 8)  # 8 columns per slab
    cuts, split = quant._slabs((512, 384), 0, block, whole=False)
    assert split == (block[1] > 8) and len(cuts) == 384 // 8
    q_split, s_split, res = quant.edit(q, s, block, False, r, 0, spec)
    assert torch.equal(s_split, s_whole)
    want = edits.project_out(
        quant.dequantize(q, s, block, torch.float64), r, 0, edits.EditSpec(1.0, True, torch.float64)
    )
    per = quant.per_element(s_split, block, q_split.shape)
    t = want / per  # float64 here, float32 in the rewrite: widened by 1e-6 as verify does
    lo, hi = reference_bracket(t - 1e-6 * t.abs())[0], reference_bracket(t + 1e-6 * t.abs())[1]
    got = q_split.double()
    assert ((got >= lo - 1e-9) & (got <= hi + 1e-9)).all()
    assert res.stored <= 2 * res.bf16, res


@pytest.mark.parametrize("method", ["mxfp4", "bitsandbytes"])
def test_leftover_quantization_config_on_float_weights(tmp_path, checkpoint, job, method):
    """A dequantized copy that kept its quantization_config (as dequantized gpt-oss releases
    keep mxfp4's) is edited as floats: the config only matters where the weights really are
    quantized; one this tool could not edit is then a warning."""
    model = tmp_path / "model"
    shutil.copytree(checkpoint("gpt_oss"), model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (model / "config.json").write_text(json.dumps(config))
    res = run_cli("ablate", job(model))
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert not any("quantized" in e for e in record["edits"])
    assert ("every tensor is a float: edited as floats" in res.stderr) == (method != "mxfp4")
