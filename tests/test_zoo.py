"""Every family a table covers, built from transformers' own config and model classes, checked
against the model's own modules:

1. the default orders (readers and routers from a layer on) edit exactly the readers the model
   has, found behaviourally (zoo.read_map), each with the norm, and the gain form, it really
   reads through;
2. after the edit, moving the residual stream where a reader reads it along r changes what the
   reader computes by the norm's per-token denominator only;
3. with every writer edited (embeddings and biases too), no layer's residual stream has any
   component along r (DESIGN's invariant).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import zoo
from conftest import make_measurements, run_cli, save_sharded, write_orders
from safetensors.torch import load_file
from test_invariant import worst_alignment

from ablation import orders as orders_mod
from ablation import refuse, rewrite
from ablation.architecture import families
from ablation.live import Layout

transformers = pytest.importorskip("transformers")

START = 1  # the default orders' first edited layer in these tests (layer 0 stays untouched)
IDS = zoo.IDS_FOR_PERTURBATION


def test_every_zoo_type_has_a_table_and_every_table_type_is_built():
    """The zoo builds every model type a table names that transformers can build as a causal
    LM on its own; the multimodal wrappers are built in test_multimodal_layouts."""
    table_types = {t: f.family for f in families().values() for t in f.model_types}
    text_of = {m: zoo.multimodal_text_type(m) for m in zoo.MULTIMODAL}
    built = {k.split("@")[0] for k in zoo.ZOO} | set(zoo.MULTIMODAL) | set(text_of.values())
    assert built <= set(table_types), sorted(built - set(table_types))
    unbuilt = set(table_types) - built - zoo.NOT_BUILT.keys()
    assert not unbuilt, sorted(unbuilt)


def _checkpoint(key: str, root: Path) -> Path:
    model = zoo.multimodal_model(key) if key in zoo.MULTIMODAL else zoo.zoo_model(key)
    return save_sharded(model, root / "model", max_shard_size="20KB")


def _orders(tmp_path: Path, model_dir: Path, n: int, r: torch.Tensor, **body) -> Path:
    meas = tmp_path / "m.refuse"
    refuse.save(meas, make_measurements(n, zoo.HIDDEN, seed=3, direction=r))
    return write_orders(
        tmp_path / "orders.yaml",
        model=str(model_dir),
        measurements=str(meas),
        output=str(tmp_path / "out"),
        **body,
    )


def _direction(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(zoo.HIDDEN, generator=g), dim=0)


def _layer_path(model: torch.nn.Module) -> str:
    layers = zoo.decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def _module_of(layout: Layout, name: str, shape: tuple[int, ...]) -> str:
    found = layout.locate(name, shape)
    assert found is not None, f"the loaded model has no parameter for {name}"
    return found[0].rsplit(".", 1)[0]


def _table_readers(plan: rewrite.Plan, model, layer: int) -> dict[str, tuple]:
    """Module (under the decoder layer) -> the norms the plan edits it behind (in order)."""
    layout = Layout(model)
    lp = f"{_layer_path(model)}.{layer}."
    out: dict[str, tuple] = {}
    for e in plan.edits:
        t = e.target
        if t.layer != layer or not t.is_reader:
            continue
        module = _module_of(layout, t.name, tuple(t.info.shape)).removeprefix(lp)
        assert out.setdefault(module, t.norms) == t.norms, f"{module}: two sets of norms"
    return out


def _writer_modules(plan: rewrite.Plan, model, layer: int) -> set[str]:
    layout = Layout(model)
    lp = f"{_layer_path(model)}.{layer}."
    return {
        _module_of(layout, t.name, tuple(t.info.shape)).removeprefix(lp)
        for t in plan.arch.targets(layer)
        if not t.is_reader and not t.is_bias
    }


FORMS = {"rms": ("w", "1+w"), "layernorm": ("layernorm",), "layernorm+bias": ("layernorm",)}


def check_readers(model_dir: Path, tmp_path: Path) -> None:
    n = zoo.num_layers(model_dir)
    r = _direction()
    orders = _orders(
        tmp_path,
        model_dir,
        n,
        r,
        components=["readers", "router"],
        ablate=[{"layers": f"{START}-{n - 1}", "measurement": START}],
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    plan = rewrite.build_plan(orders_mod.load(orders), model_dir, tmp_path / "m.refuse")
    base = zoo.load(model_dir)
    edited = zoo.load(tmp_path / "out")
    maps = zoo.read_map(base, IDS)
    weights = {}
    for f in model_dir.glob("*.safetensors"):
        weights.update(load_file(f))
    for layer in range(START, n):
        info = maps[layer]
        table = _table_readers(plan, base, layer)
        found = {re.sub(r"\.\d+\.", ".", m): rd for m, rd in info.readers.items()}
        table = {re.sub(r"\.\d+\.", ".", m): v for m, v in table.items()}
        assert set(found) == set(table), (
            f"layer {layer}: readers the model has but the table misses: "
            f"{sorted(set(found) - set(table))}; the table names but the model does not "
            f"read the stream with: {sorted(set(table) - set(found))}"
        )
        writers = _writer_modules(plan, base, layer)
        odd = set(info.unexplained) - writers
        assert not odd, f"layer {layer}: hidden-wide inputs of no known form: {sorted(odd)}"
        for module, read in found.items():
            norms = table[module]
            assert len(read.chain) == len(norms), (
                f"layer {layer} {module}: the model reads it through {len(read.chain)} norms, "
                f"the table names {[n.name for n in norms]}"
            )
            for step, norm in zip(read.chain, norms, strict=True):
                assert norm.form in FORMS[step.form], (
                    f"layer {layer} {module}: the model reads through a {step.form}, the table "
                    f"says {norm.form} ({norm.name})"
                )
                gain = weights[norm.name].double() + norm.offset
                assert zoo.gains_agree(step.gain, gain), (
                    f"layer {layer} {module}: the gain it reads through is not {norm.form} of "
                    f"{norm.name}"
                )
        _check_blind(base, edited, plan, layer, info, found)


def _check_blind(base, edited, plan, layer, info, found) -> None:
    """Moving the stream where each reader reads it along r changes the edited reader's output
    only by the norm's denominator, and the unedited reader's by more."""
    r = plan.directions[f"layer{layer}"].float()
    by_state: dict[int, list[str]] = {}
    for module, read in found.items():
        by_state.setdefault(read.state, []).append(module)
    for state, modules in by_state.items():
        names = [m for m in info.readers if re.sub(r"\.\d+\.", ".", m) in modules]
        worst_edited = zoo.perturbed_change(edited, layer, info, state, names, r)
        worst_base = zoo.perturbed_change(base, layer, info, state, names, r)
        for m in names:
            assert worst_edited[m] < 1e-4, (
                f"layer {layer} {m}: moving the stream along r changes its output by "
                f"{worst_edited[m]:.1e} beyond the norm's denominator"
            )
        assert max(worst_base.values()) > 1e-2, f"layer {layer}: r does not reach {names}"


def check_writers(model_dir: Path, tmp_path: Path) -> None:
    n = zoo.num_layers(model_dir)
    r = _direction(11)
    orders = _orders(
        tmp_path,
        model_dir,
        n,
        r,
        components=["writers", "embed", "biases"],
        projected=False,
        ablate=[{"layers": f"0-{n - 1}", "measurement": 0}],
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert max(e["max_rel_projection"] for e in record["edits"]) < 1e-5
    before = zoo.load(model_dir)
    after = zoo.load(tmp_path / "out")
    assert worst_alignment(zoo.residual_streams(before, IDS), r) > 1e-2
    assert worst_alignment(zoo.residual_streams(after, IDS), r) < 1e-4


KEYS = sorted(zoo.ZOO) + sorted(zoo.MULTIMODAL)


@pytest.mark.parametrize("key", KEYS)
def test_default_orders_edit_every_reader_exactly(key, tmp_path):
    check_readers(_checkpoint(key, tmp_path), tmp_path)


@pytest.mark.parametrize("key", KEYS)
def test_writers_leave_nothing_along_r(key, tmp_path):
    check_writers(_checkpoint(key, tmp_path), tmp_path)


def _with_table(monkeypatch, name: str, **update) -> None:
    """Replace one family table for a test (the checks must fail on a wrong table)."""
    import ablation.architecture as arch

    tables = dict(families())
    tables[name] = tables[name].model_copy(update=update)
    monkeypatch.setattr(arch, "families", lambda: tables)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop k_proj", "the table misses: ['self_attn.k_proj']"),
        ("gain 1+w", "the gain it reads through is not 1+w"),
        ("layernorm", "the model reads through a rms, the table says layernorm"),
        ("no norm", "the model reads it through 1 norms, the table names []"),
    ],
)
def test_a_wrong_table_fails_the_checks(change, message, tmp_path, monkeypatch):
    """The comparison is not vacuous: a table that misses a reader, gets a gain form wrong or
    forgets a norm fails it."""
    model_dir = _checkpoint("llama", tmp_path)
    rows = families()["llama"].tensors
    if change == "drop k_proj":
        _with_table(monkeypatch, "llama", tensors=[t for t in rows if "k_proj" not in t.name])
    elif change == "gain 1+w":
        _with_table(monkeypatch, "llama", norm_form="1+w")
    elif change == "layernorm":
        _with_table(monkeypatch, "llama", norm_form="layernorm")
    else:
        rows = [t.model_copy(update={"norm": None}) if "q_proj" in t.name else t for t in rows]
        _with_table(monkeypatch, "llama", tensors=rows)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_readers(model_dir, tmp_path)


def test_a_missing_writer_fails_the_invariant(tmp_path, monkeypatch):
    model_dir = _checkpoint("olmo2", tmp_path)
    rows = families()["olmo2"].tensors
    _with_table(  # OLMo 2's post-norm forgotten: the edit is no longer exact
        monkeypatch,
        "olmo2",
        tensors=[t.model_copy(update={"norm": None}) if t.role == "mlp_out" else t for t in rows],
    )
    with pytest.raises(AssertionError, match=r"assert .* < 0.0001"):
        check_writers(model_dir, tmp_path)


@pytest.mark.parametrize("key", ["qwen3_5_moe", "phi3"])
def test_default_pipeline_end_to_end(key, tmp_path):
    """analyze --emit-orders, then the orders as written, then verify, then transformers loads
    the output: Qwen3.5-MoE as released (multimodal prefix, hybrid linear attention, (1 + w)
    norms, vision tower untouched) and Phi-3 (fused qkv_proj and gate_up_proj)."""
    model_dir = _checkpoint(key, tmp_path)
    n = zoo.num_layers(model_dir)
    refuse.save(tmp_path / "m.refuse", make_measurements(n, zoo.HIDDEN, seed=5))
    orders = tmp_path / "orders.yaml"
    res = run_cli(
        "analyze",
        tmp_path / "m.refuse",
        "--emit-orders",
        orders,
        "--model",
        model_dir,
        "--output",
        tmp_path / "out",
    )
    assert res.exit_code == 0, res.output + res.stderr
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    roles = record["counts_by_role"]
    assert roles.get("attn_in") and (roles.get("mlp_in") or roles.get("expert_in"))
    assert not any("visual" in e["tensor"] for e in record["edits"])
    res = run_cli("verify", tmp_path / "out", "--orders", orders)
    assert res.exit_code == 0, res.output + res.stderr
    out = zoo.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(out(input_ids=IDS).logits).all()


def _unknown(tmp_path: Path, key: str) -> Path:
    """A checkpoint of a known family under a model_type no table names."""
    model_dir = _checkpoint(key, tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "mystery_lm"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


def test_unknown_family_gets_writers_only(tmp_path):
    """The generic table edits writers, where the norms sit as in Llama, and refuses readers
    and the default orders with one line naming what to use instead."""
    model_dir = _unknown(tmp_path, "llama")
    n = zoo.SMALL["num_hidden_layers"]
    refuse.save(tmp_path / "m.refuse", make_measurements(n, zoo.HIDDEN, seed=5))
    args = ["analyze", tmp_path / "m.refuse", "--emit-orders", tmp_path / "o.yaml"]
    args += ["--model", model_dir, "--output", tmp_path / "out"]
    res = run_cli(*args)
    assert res.exit_code == 2 and not (tmp_path / "o.yaml").exists()
    assert "use --components writers" in res.stderr and "gain form" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.startswith("error:")]) == 1
    assert run_cli(*args, "--components", "writers").exit_code == 0
    assert run_cli("ablate", tmp_path / "o.yaml").exit_code == 0


def test_unknown_family_with_post_norms_is_refused(tmp_path):
    """OLMo 2 under an unknown model_type: its sublayers write through post-norms the generic
    table cannot place, so even its writer orders are one line, not an inexact edit."""
    model_dir = _unknown(tmp_path, "olmo2")
    n = zoo.SMALL["num_hidden_layers"]
    r = _direction()
    orders = _orders(
        tmp_path, model_dir, n, r, components=["writers"], ablate=[{"layers": f"0-{n - 1}"}]
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 2
    assert "holds norms the generic table does not place" in res.stderr
    assert "post_feedforward_layernorm" in res.stderr


def test_refused_families_are_one_line(tmp_path):
    """Families no table can edit exactly are named with the reason, before anything runs."""
    from ablation.architecture import refused

    table_types = {t for f in families().values() for t in f.model_types}
    assert refused() and not set(refused()) & table_types
    for model_type in refused():  # each is a model type transformers really ships
        transformers.AutoConfig.for_model(model_type)
    model_dir = _checkpoint("llama", tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "longcat_flash"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    orders = _orders(tmp_path, model_dir, 4, _direction(), ablate=[{"layers": "1-3"}])
    res = run_cli("ablate", orders)
    assert res.exit_code == 2
    assert "model_type 'longcat_flash' cannot be edited exactly: LongCat-Flash's zero" in res.stderr


@pytest.mark.parametrize("key", ["qwen3_vl_moe", "kimi_linear", "granitemoe", "mistral_large4"])
def test_in_memory_edit_equals_the_rewritten_checkpoint(key, tmp_path):
    """live.apply (tune, frontier) finds every checkpoint tensor in the loaded model through
    transformers' own conversions (Qwen3-VL-MoE's transposed experts, Kimi-Linear's renamed
    and stacked ones, Granite's renamed fused ones, Mistral Large's own names) and edits it to
    the bytes the rewriter writes."""
    from ablation import live

    model_dir = _checkpoint(key, tmp_path)
    n = zoo.num_layers(model_dir)
    orders = _orders(
        tmp_path,
        model_dir,
        n,
        _direction(),
        components=["writers", "readers", "router"],
        ablate=[{"layers": f"0-{n - 1}", "measurement": 1}],
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    written = zoo.load(tmp_path / "out").state_dict()
    model = zoo.load(model_dir)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    plan = rewrite.build_plan(orders_mod.load(orders), model_dir, tmp_path / "m.refuse")
    touched = live.apply(model, plan)
    state = model.state_dict()
    assert any(not torch.equal(state[k], fresh[k]) for k in state if "expert" in k)
    for k, v in state.items():
        assert torch.equal(v, written[k]), k
    live.restore(model, plan.index, touched)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k


def check_head(model_dir: Path, tmp_path: Path) -> None:
    """components [head] alone: the output head reads the final stream through the norm the
    table names, in its gain form (found behaviourally, as for the readers), and after the edit
    a move of the final stream along r changes the logits by the norm's denominator only. A
    head tied to the embeddings is written untied: the embeddings keep their bytes."""
    n = zoo.num_layers(model_dir)
    orders = _orders(
        tmp_path,
        model_dir,
        n,
        _direction(5),
        components=["head"],
        ablate=[{"layer": n - 1, "measurement": 1}],
    )
    res = run_cli("ablate", orders)
    assert res.exit_code == 0, res.output + res.stderr
    assert run_cli("verify", tmp_path / "out", "--orders", orders).exit_code == 0
    plan = rewrite.build_plan(orders_mod.load(orders), model_dir, tmp_path / "m.refuse")
    (e,) = plan.edits
    (norm,) = e.target.norms
    base, edited = zoo.load(model_dir), zoo.load(tmp_path / "out")
    if e.target.write_as:  # untied: the embeddings as they were, the head edited
        assert torch.equal(edited.get_input_embeddings().weight, base.get_input_embeddings().weight)
        assert edited.get_output_embeddings().weight is not edited.get_input_embeddings().weight
    norm_module = _module_of(Layout(base), norm.name, tuple(plan.index.tensors[norm.name].shape))
    read = zoo.head_read(base, norm_module)
    assert len(read.chain) == 1, "the head does not read the final norm's output"
    step = read.chain[0]
    assert norm.form in FORMS[step.form], f"the final norm is a {step.form}, not {norm.form}"
    weights = {}
    for f in model_dir.glob("*.safetensors"):
        weights.update(load_file(f))
    assert zoo.gains_agree(step.gain, weights[norm.name].double() + norm.offset)
    r = plan.directions["head"].float()
    assert zoo.head_change(edited, norm_module, read, r) < 1e-4
    assert zoo.head_change(base, norm_module, read, r) > 1e-2


@pytest.mark.parametrize("key", KEYS)
def test_head_reads_through_the_final_norm(key, tmp_path):
    check_head(_checkpoint(key, tmp_path), tmp_path)
