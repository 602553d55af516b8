"""The edit options beyond one direction on every writer: subspaces, sparse surgery, readers,
layer kernels, per-entry components; the in-memory application that scores them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import HIDDEN, make_measurements, num_layers_of, run_cli

from ablation import directions, edits, live, orders, refuse, rewrite, verify
from ablation.errors import AblationError

transformers = pytest.importorskip("transformers")


def _basis(k: int, hidden: int = 48, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return directions.orthonormal(torch.randn(k, hidden, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("norm_preserving", [True, False])
def test_subspace_edit_removes_every_basis_direction(axis, norm_preserving):
    q = _basis(3)
    w = torch.randn(48, 40, dtype=torch.float64) if axis == 0 else torch.randn(40, 48).double()
    spec = edits.EditSpec(1.0, norm_preserving, torch.float64)
    out = edits.project_out(w, q, axis, spec)
    v, vo = w.movedim(axis, -1), out.movedim(axis, -1)  # [n, hidden]
    assert (vo @ q.T).abs().max().item() < 1e-12  # every vector orthogonal to every q_i
    if norm_preserving:
        torch.testing.assert_close(vo.norm(dim=-1), v.norm(dim=-1), rtol=1e-12, atol=0)
    else:  # W' = W - Q^T Q W, per vector
        torch.testing.assert_close(vo, v - (v @ q.T) @ q, rtol=0, atol=1e-12)


def test_subspace_of_one_is_the_rank_one_edit():
    q = _basis(1)
    w = torch.randn(48, 30, dtype=torch.float64)
    spec = edits.EditSpec(0.7, True, torch.float64)
    torch.testing.assert_close(
        edits.project_out(w, q, 0, spec), edits.project_out(w, q[0], 0, spec), rtol=0, atol=0
    )


@pytest.mark.parametrize("rows", [0.1, 0.25, 0.5])
def test_sparse_surgery_edits_only_the_chosen_fraction(rows, monkeypatch):
    monkeypatch.setattr(edits, "CHUNK_ELEMENTS", 48 * 7)  # several chunks per tensor
    d = _basis(1)[0]
    w = torch.randn(48, 64).to(torch.bfloat16)  # [hidden, k]: 64 column vectors
    out = edits.project_out(w, d, 0, edits.EditSpec(1.0, True, rows=rows))
    changed = (out.view(torch.int16) != w.view(torch.int16)).any(dim=0)  # per column, by bytes
    want = math.ceil(rows * 64)
    top = (w.double().T @ d).abs().topk(want).indices  # the largest |v.d|
    assert int(changed.sum()) <= want
    assert set(changed.nonzero().flatten().tolist()) <= set(top.tolist())
    assert int(changed.sum()) >= want - 1  # (a column may round back to its own bytes)
    kept = ~changed
    assert torch.equal(out[:, kept].view(torch.int16), w[:, kept].view(torch.int16))
    edited = out[:, top].double()
    rel = (edited.T @ d).abs() / edited.norm(dim=0)
    assert rel.max().item() < 1e-2  # bf16 rounding of the edited columns
    torch.testing.assert_close(
        edited.norm(dim=0), w[:, top].double().norm(dim=0), rtol=1e-2, atol=0
    )


def test_subspace_from_states_starts_with_the_direction():
    g = torch.Generator().manual_seed(0)
    harmless = torch.randn(32, generator=g, dtype=torch.float64)
    harmful = harmless + torch.randn(50, 32, generator=g, dtype=torch.float64)
    _, unit = directions.refusal(harmful.mean(0), harmless)
    b = directions.subspace(harmful, harmless, unit, 5)
    assert b.shape == (5, 32)
    torch.testing.assert_close(b @ b.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(b[0], unit, atol=1e-12, rtol=0)
    h = harmless / harmless.norm()
    assert (b @ h).abs().max().item() < 1e-12  # biprojected: no harmless-mean direction


def test_norm_folded_basis_makes_contributions_orthogonal():
    q = _basis(3, 24)
    gamma = torch.randn(24, dtype=torch.float64)
    qg = directions.norm_direction(q, [directions.Gain(gamma, 1.0)])
    y = torch.randn(100, 24, dtype=torch.float64)
    y = y - (y @ qg.T) @ qg  # a writer's output after the edit
    assert ((y * (1 + gamma)) @ q.T).abs().max().item() < 1e-12  # what reaches the stream


def test_refuse_basis_round_trip_and_old_files(tmp_path):
    meas = make_measurements(3, 16)
    meas.layers[1].extra["basis"] = _basis(2, 16).float()
    refuse.save(tmp_path / "m.refuse", meas)
    back = refuse.load(tmp_path / "m.refuse")
    assert torch.equal(back.layers[1].basis, meas.layers[1].extra["basis"])
    assert back.layers[0].basis.shape == (1, 16)  # no basis stored: the direction alone
    meas.layers[2].extra["basis"] = torch.zeros(3)
    refuse.save(tmp_path / "bad.refuse", meas)
    with pytest.raises(Exception, match="basis_2 has shape"):
        refuse.load(tmp_path / "bad.refuse")


def test_kernel_and_entry_components_expand(tmp_path):
    p = tmp_path / "o.yaml"
    p.write_text(
        "model: m\nmeasurements: m.refuse\noutput: out\n"
        "ablate:\n"
        "  - kernel: {peak: 5, width: 2, max_scale: 1.0, min_scale: 0.5}\n"
        "    measurement: 5\n"
        "  - layers: 4-6\n"
        "    components: [readers]\n"
        "    directions: 2\n"
        "    rows: 0.5\n"
    )
    o = orders.load(p)
    writers = {x.layer: x.scale for x in o.layers if "attn_out" in x.components}
    assert writers == {3: 0.5, 4: 0.75, 5: 1.0, 6: 0.75, 7: 0.5}
    readers = [x for x in o.layers if x.components == ("attn_in", "mlp_in", "experts_in")]
    assert [x.layer for x in readers] == [4, 5, 6]
    assert all(x.directions == 2 and x.rows == 0.5 and x.measurement == x.layer for x in readers)


@pytest.fixture
def tiny(checkpoint, tmp_path):
    """A gemma3_text checkpoint (post-norms, (1 + w) gains) with a random .refuse holding a
    basis per layer."""
    model_dir = checkpoint("gemma3_text")
    n = num_layers_of(model_dir)
    meas = make_measurements(n, HIDDEN, seed=2)
    for lm in meas.layers.values():
        states = lm.harmful + torch.randn(20, HIDDEN, generator=torch.Generator().manual_seed(5))
        lm.extra["basis"] = directions.subspace(states, lm.harmless, lm.refusenorm, 4).float()
    refuse.save(tmp_path / "m.refuse", meas)
    return model_dir, tmp_path / "m.refuse", n


def _orders(tmp_path, model_dir, meas_path, **body):
    doc = {"model": str(model_dir), "measurements": str(meas_path), "output": str(tmp_path / "out")}
    p = tmp_path / "orders.yaml"
    import yaml

    p.write_text(yaml.safe_dump({**doc, **body}, sort_keys=False))
    return p


def test_readers_edit_equals_removing_r_from_what_they_read(tiny, tmp_path):
    """Reader-side ablation from layer 1 on: the edited weights give exactly what the original
    model gives when every reader sees its normed input y = g * x / rms(x) computed from x
    with its component along r removed, i.e. y - ((y / g) . r) (g * r)."""
    model_dir, meas_path, n = tiny
    p = _orders(
        tmp_path,
        model_dir,
        meas_path,
        projected=False,
        components=["readers"],
        ablate=[{"layers": f"1-{n - 1}", "measurement": 1}],
    )
    plan = rewrite.build_plan(orders.load(p), model_dir, meas_path)
    roles = plan.counts_by_role()
    assert roles["attn_in"] == 3 * (n - 1) and roles["mlp_in"] == 2 * (n - 1)
    assert not any(e.norm_preserving for e in plan.edits)  # an oblique edit keeps no norms
    r = refuse.load(meas_path).layers[1].refusenorm.double()
    r = r / r.norm()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    hooks = []
    for e in plan.edits:
        g = 1.0 + params[e.target.norms[0].name].detach().double()  # Gemma: (1 + w)

        def pre(_m, args, g=g):
            y = args[0].double()
            return ((y - ((y / g) @ r).unsqueeze(-1) * (g * r)).float(),)

        hooks.append(modules[e.target.name.removesuffix(".weight")].register_forward_pre_hook(pre))
    with torch.no_grad():
        hooked = model(ids).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain = model(ids).logits
    touched = live.apply(model, plan)
    with torch.no_grad():
        edited = model(ids).logits
    assert (plain - hooked).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(edited, hooked, atol=1e-4, rtol=1e-4)
    live.restore(model, plan.index, touched)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k  # restore from disk puts every byte back


def test_reader_projection_is_exact_and_idempotent():
    g = torch.Generator().manual_seed(4)
    q = _basis(2, 24)
    gamma = torch.rand(24, generator=g, dtype=torch.float64) * 50
    pair = directions.reader_projection(q, gamma, 1.0)
    w = torch.randn(7, 24, generator=g, dtype=torch.float64)  # a reader [out, hidden]
    out = edits.project_out(w, pair, 1, edits.EditSpec(1.0, False, torch.float64))
    gq = (1.0 + gamma) * q  # what a component along q_i looks like after the norm's gain
    assert (out @ gq.T).abs().max().item() < 1e-9 * w.abs().max().item() * gq.norm().item()
    y = torch.randn(5, 24, generator=g, dtype=torch.float64)
    x = y / (1.0 + gamma)
    want = ((x - (x @ q.T) @ q) * (1.0 + gamma)) @ w.T  # reading x without span(q)
    torch.testing.assert_close(y @ out.T, want, rtol=1e-9, atol=1e-9)
    again = edits.project_out(out, pair, 1, edits.EditSpec(1.0, False, torch.float64))
    torch.testing.assert_close(again, out, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "body",
    [
        {"components": ["writers", "readers"], "directions": 3},
        {"components": ["writers"], "rows": 0.25},
        {
            "ablate": [
                {"kernel": {"peak": 1, "width": 1, "min_scale": 0.5}, "measurement": 1},
                {"layers": "1-2", "components": ["readers"], "measurement": 1},
            ]
        },
    ],
)
def test_in_memory_edit_equals_the_rewritten_checkpoint(tiny, tmp_path, body):
    """One math path: what live.apply does to the loaded model is, byte for byte, what
    sharded_ablate.py writes (float32 checkpoint)."""
    model_dir, meas_path, n = tiny
    body = {"ablate": [{"layers": f"0-{n - 1}", "measurement": 1}], **body}
    p = _orders(tmp_path, model_dir, meas_path, **body)
    res = run_cli("ablate", p)
    assert res.exit_code == 0, res.output + res.stderr
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    live.apply(model, rewrite.build_plan(orders.load(p), model_dir, meas_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, written[k]), k
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert record["edits"]
    res = run_cli("verify", tmp_path / "out", "--orders", p)
    assert res.exit_code == 0, res.output + res.stderr


def test_subspace_writers_orthogonal_in_the_checkpoint(tiny, tmp_path):
    """Every edited writer vector is orthogonal to every (norm-folded) basis direction."""
    model_dir, meas_path, n = tiny
    p = _orders(
        tmp_path,
        model_dir,
        meas_path,
        directions=4,
        components=["writers"],
        ablate=[{"layers": f"0-{n - 1}", "measurement": 1}],
    )
    plan = rewrite.build_plan(orders.load(p), model_dir, meas_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    live.apply(model, plan)
    params = dict(model.named_parameters())
    for e in plan.edits:
        q = plan.directions[e.direction]
        assert q.shape == (4, HIDDEN)
        w = params[e.target.name].detach().double().movedim(e.target.hidden_axis, -1)
        rel = (w @ q.T).norm(dim=-1) / w.norm(dim=-1)
        assert rel.max().item() < 1e-5, e.target.name


def test_readers_on_a_layer_without_readers_is_an_error(checkpoint, tmp_path):
    model_dir = checkpoint("gpt2")
    n = num_layers_of(model_dir)
    refuse.save(tmp_path / "m.refuse", make_measurements(n, HIDDEN))
    p = _orders(
        tmp_path, model_dir, tmp_path / "m.refuse", components=["readers"], ablate=[{"layer": 1}]
    )
    res = run_cli("ablate", p)
    assert res.exit_code == 2
    assert "no attn_in or mlp_in or experts_in tensor found" in res.stderr


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "mixtral",
        "deepseek_v3",
        "glm4_moe",
        "gpt_oss",
        "llama4_text",
    ],
)
def test_readers_of_every_family_are_blind_to_r(family, checkpoint, tmp_path):
    """Every reader of every layer (attention, MLP, routed and shared experts, routers) is
    found, edited, and then maps g * r (the direction as it arrives through its norm) to 0."""
    model_dir = checkpoint(family)
    n = num_layers_of(model_dir)
    r = torch.nn.functional.normalize(
        torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9)), dim=0
    )
    refuse.save(tmp_path / "m.refuse", make_measurements(n, HIDDEN, direction=r))
    p = _orders(
        tmp_path,
        model_dir,
        tmp_path / "m.refuse",
        projected=False,
        components=["readers", "router"],
        ablate=[{"layers": f"0-{n - 1}", "measurement": 0}],
    )
    res = run_cli("ablate", p)
    assert res.exit_code == 0, res.output + res.stderr
    assert run_cli("verify", tmp_path / "out", "--orders", p).exit_code == 0
    plan = rewrite.build_plan(orders.load(p), model_dir, tmp_path / "m.refuse")
    roles = plan.counts_by_role()
    assert roles.get("attn_in", 0) >= n and (roles.get("mlp_in", 0) or roles.get("expert_in"))
    params, old = _tensors(tmp_path / "out"), _tensors(model_dir)  # names as on disk
    for e in plan.edits:
        norm = e.target.norms[0] if e.target.norms else None
        g = norm.offset + old[norm.name].double() if norm else 1.0
        w = params[e.target.name].double().movedim(e.target.hidden_axis, -1)
        w0 = old[e.target.name].double().movedim(e.target.hidden_axis, -1)
        gr = g * r.double()
        assert (w @ gr).abs().max() <= 1e-5 * (w0 @ gr).abs().max(), e.target.name
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(after(ids).logits).all()


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_in_memory_edit_of_experts_fused_on_load(checkpoint, tmp_path, family):
    """transformers fuses per-expert checkpoint tensors into one [experts, ...] parameter on
    load (Qwen-MoE, Mixtral, DeepSeek; gpt-oss is fused on disk already): the in-memory edit
    finds each expert's slice through transformers' own conversion rules and edits it to the
    bytes the rewriter writes; restore puts the checkpoint's bytes back."""
    model_dir = checkpoint(family)
    n = num_layers_of(model_dir)
    meas = tmp_path / "m.refuse"
    refuse.save(meas, make_measurements(n, HIDDEN, seed=4))
    p = _orders(
        tmp_path,
        model_dir,
        meas,
        components=["writers", "readers", "router"],
        ablate=[{"layers": f"0-{n - 1}", "measurement": 1}],
    )
    res = run_cli("ablate", p)
    assert res.exit_code == 0, res.output + res.stderr
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    plan = rewrite.build_plan(orders.load(p), model_dir, meas)
    assert any(e.target.role == "expert_out" for e in plan.edits)
    touched = live.apply(model, plan)
    state = model.state_dict()
    assert any("experts" in k and not torch.equal(state[k], fresh[k]) for k in state)
    for k, v in state.items():
        assert torch.equal(v, written[k]), k
    live.restore(model, plan.index, touched)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k


@pytest.mark.parametrize("k", [1, 3])
def test_reader_edit_is_blind_to_r_where_a_gain_is_zero(k):
    """gemma-3-270m has norm gains of exactly 0 (gamma = -1): the reader never sees those dims,
    so r . x is estimated from the others, and unscaled that left r's mass on the hidden dims
    (0.3% in its layer 10) of every move along r: verify's float32 bar (1e-4) failed. The pair
    is rescaled so that W' u = 0 exactly, in float64 and as stored in float32."""
    g = torch.Generator().manual_seed(5)
    hidden = 64
    q = _basis(k, hidden)
    gamma = torch.rand(hidden, generator=g, dtype=torch.float64) * 30
    gamma[[3, 17, 40]] = -1.0  # g = 1 + gamma = 0 there
    pair = directions.reader_projection(q, gamma, 1.0)
    u = q * (1.0 + gamma)  # [k, hidden]: a move along r_i as the reader sees it
    w = torch.randn(32, hidden, generator=g, dtype=torch.float64)  # a reader [out, hidden]
    out = edits.project_out(w, pair, 1, edits.EditSpec(1.0, False, torch.float64))
    assert (out @ u.T).abs().max() < 1e-12 * w.abs().max() * u.norm()  # [32, k]
    again = edits.project_out(out, pair, 1, edits.EditSpec(1.0, False, torch.float64))
    torch.testing.assert_close(again, out, rtol=0, atol=1e-12)  # a projection: idempotent
    stored = edits.project_out(w.float(), pair, 1, edits.EditSpec(1.0, False))
    _, rel = edits.projection_residue(stored, pair, 1)
    assert rel < verify.tolerance(torch.float32)
    with pytest.raises(AblationError, match="hides the direction"):
        mostly_hidden = torch.zeros(1, hidden, dtype=torch.float64)
        mostly_hidden[0, 3], mostly_hidden[0, 5] = (1 - 1e-8) ** 0.5, 1e-4  # 1e-8 visible
        directions.reader_projection(mostly_hidden, gamma, 1.0)
