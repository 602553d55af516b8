"""Tiny random models of every family transformers ships that a table covers, and a behavioural
map of what reads the residual stream in them.

The map does not look at names: it runs the model with hooks on every module of a decoder
layer and calls a weighted module a *reader* when its input is, row for row, the layer's
residual stream seen through at most a per-token scale and a per-dim gain (an RMSNorm), the
same after the mean is removed (a LayerNorm), or the stream itself. The gain it finds is
compared with the table's norm tensor, so a wrong gain form (`w` against `1 + w`) fails too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers

HIDDEN = 32
SMALL = dict(
    vocab_size=128,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    moe_intermediate_size=16,
    num_experts=4,
    n_routed_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FOUR = ["full_attention"] * 4


def tiny_config(model_type: str, **overrides):
    """A config of transformers' own class for `model_type`, shrunk: SMALL's keys where the
    class has them, list-valued per-layer settings reset, then the overrides."""
    auto = transformers.AutoConfig
    defaults = auto.for_model(model_type).to_dict()
    kw = {k: v for k, v in SMALL.items() if k in defaults or k.endswith("token_id")}
    for key, value in defaults.items():
        if isinstance(value, list) and key.endswith(("layer_types", "_layers")):
            kw[key] = None
    kw.update(overrides)
    return auto.for_model(model_type, **kw)


def build(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random causal LM of `model_type` whose norms and biases are not at their init values
    (ones, zeros): a gain form or a bias the table misses shows."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = causal_class(config)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
        # a stream of unit scale: with init's 0.02 a norm's epsilon would weigh as much as the
        # float32 rounding the checks look for
        model.get_input_embeddings().weight.mul_(50.0)
    return model


def causal_class(config) -> type:
    """transformers' causal LM class for a config, registered with the auto classes or not
    (Mistral 4's is not)."""
    mapping = transformers.AutoModelForCausalLM._model_mapping
    if type(config) in mapping:
        return mapping[type(config)]
    for name in dir(transformers):
        if name.endswith("ForCausalLM"):
            cls = getattr(transformers, name)
            if getattr(cls, "config_class", None) is type(config):
                return cls
    raise AssertionError(f"no causal LM class for {type(config).__name__}")


def load(model_dir) -> torch.nn.Module:
    """A saved zoo model, loaded the way a user loads it."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "vision_config"):
        cls = transformers.AutoModelForImageTextToText
    else:
        cls = causal_class(config)
    return cls.from_pretrained(model_dir).eval()


def num_layers(model_dir) -> int:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return config.get_text_config().num_hidden_layers


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The text model's stack of decoder layers (num_hidden_layers of them)."""
    config = model.config.get_text_config()
    n = config.num_hidden_layers
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.endswith(("layers", ".h"))
    ]
    if len(found) != 1:
        raise AssertionError(f"cannot tell the decoder layers: {[n for n, _ in found]}")
    return found[0][1]


def run_hooked(model: torch.nn.Module, input_ids: torch.Tensor, hooks: list) -> None:
    """One forward pass without gradients, the hooks removed afterwards whatever happens."""
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _is_weighted(module: torch.nn.Module, hidden: int) -> bool:
    """A module holding a matrix (or a stack of them) with a hidden-sized axis."""
    return not isinstance(module, torch.nn.Embedding) and any(
        p.ndim >= 2 and hidden in p.shape for p in module.parameters(recurse=False)
    )


@dataclass
class Step:
    """One norm between the stream and a reader, as seen from outside."""

    form: str  # "rms" (per-token scale, per-dim gain), "layernorm", "layernorm+bias", ...
    gain: torch.Tensor  # the per-dim gain, up to a positive factor
    bias: torch.Tensor | None = None  # a LayerNorm's bias


@dataclass
class Read:
    """How a weighted module sees the residual stream: through these norms (none: the stream
    itself)."""

    module: str  # its name under the decoder layer
    state: int  # index into Layer.states: the residual state it reads
    chain: list[Step]


@dataclass
class Layer:
    states: list[torch.Tensor] = field(default_factory=list)  # raw residual states [N, hidden]
    # per state, the modules whose input it is ("" for the layer itself): where to perturb it
    sources: list[list[str]] = field(default_factory=list)
    readers: dict[str, Read] = field(default_factory=dict)
    unexplained: list[str] = field(default_factory=list)  # hidden-wide inputs of no known form


def _gain_image(
    z: torch.Tensor, s: torch.Tensor, bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit z ~ diag(c) s diag(a) (+ b) (a per-token scale c, a per-dim gain a, a per-dim bias
    b) by alternating least squares; returns (a, b, relative residue)."""
    z, s = z.double(), s.double()
    c = torch.ones(z.shape[0], dtype=torch.float64)
    a = torch.ones(z.shape[1], dtype=torch.float64)
    b = torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(60 if bias else 30):
        cs = c.unsqueeze(1) * s  # [N, H]
        if bias:  # per column, a least-squares line through (cs, z)
            mc, mz = cs.mean(0), z.mean(0)
            a = ((cs - mc) * (z - mz)).sum(0) / ((cs - mc) ** 2).sum(0).clamp_min(1e-300)
            b = mz - a * mc
        else:
            a = (z * cs).sum(0) / (cs * cs).sum(0).clamp_min(1e-300)  # [H]
        sa = s * a  # [N, H]
        c = ((z - b) * sa).sum(1) / (sa * sa).sum(1).clamp_min(1e-300)  # [N]
    fit = c.unsqueeze(1) * s * a + b
    res = ((z - fit).norm() / z.norm().clamp_min(1e-300)).item()
    if (c < 0).float().mean() > 0.5:  # make the gain the positive-scale one
        a = -a
    return a, b, res


def _rows_in(z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the non-zero rows of z, for each the row of s it is a positive multiple of): gathered
    tokens, each maybe scaled by its routing weight (Llama 4 zeroes the unrouted); or None."""
    if z.shape == s.shape and torch.equal(z, s):
        return None
    keep = z.double().norm(dim=-1) > 0
    if not keep.any():
        return None
    zn = torch.nn.functional.normalize(z[keep].double(), dim=-1)
    sn = torch.nn.functional.normalize(s.double(), dim=-1)
    best, idx = (zn @ sn.T).max(dim=1)  # [n, hidden] @ [hidden, N] -> [n, N] -> [n]
    return (keep, idx) if bool((best >= 1 - 1e-9).all()) else None


def _classify(z: torch.Tensor, states: list[torch.Tensor]) -> tuple[int, str, torch.Tensor | None]:
    """The residual state z is read from, and how; (-1, "", None) when none explains it."""
    i, form, gain, _ = _classify_full(z, states)
    return i, form, gain


def _classify_full(
    z: torch.Tensor, states: list[torch.Tensor]
) -> tuple[int, str, torch.Tensor | None, torch.Tensor | None]:
    for i, s in enumerate(states):
        if z.shape[0] != s.shape[0]:
            continue
        tol = 1e-6 * s.abs().max().clamp_min(1e-30)
        if torch.allclose(z.double(), s.double(), rtol=0, atol=float(tol)):
            return i, "none", None, None
        centred = s - s.mean(dim=-1, keepdim=True)
        for form, base, bias in (
            ("rms", s, False),
            ("layernorm", centred, False),
            ("layernorm+bias", centred, True),
            ("rms+bias", s, True),
        ):
            gain, b, res = _gain_image(z, base, bias)
            if res < 1e-5:
                return i, form, gain, (b if bias else None)
    return -1, "", None, None


def _is_sum(t: torch.Tensor, state: torch.Tensor, outputs: list[torch.Tensor]) -> bool:
    """t is state plus a scalar times one module's output (the stream after a sublayer)."""
    d = (t - state).double()
    for o in outputs:
        if o.shape != t.shape:
            continue
        o = o.double()
        alpha = (d * o).sum() / (o * o).sum().clamp_min(1e-300)
        if (d - alpha * o).norm() <= 1e-6 * max(d.norm().item(), t.double().norm().item()):
            return bool(alpha.abs() > 1e-12)
    return False


def read_map(model: torch.nn.Module, input_ids: torch.Tensor) -> list[Layer]:
    """Per decoder layer: its raw residual states and every weighted module that reads one.
    Raw states are the layer's input, the input of any module that is not an image of a state
    already known (the stream after a sublayer, as the next norm sees it), and a weighted
    module's input that is a known state plus one module's output (a sublayer with no norm in
    front, reading the stream right after another sublayer wrote to it)."""
    layers = decoder_layers(model)
    hidden = model.config.get_text_config().hidden_size
    ins: list[list[tuple[str, torch.Tensor]]] = [[] for _ in layers]
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []

    def flat(t) -> torch.Tensor | None:
        if isinstance(t, tuple):
            t = t[0] if t else None
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1] == hidden:
            return t.detach().reshape(-1, hidden).clone()
        return None

    def record(i: int, name: str) -> tuple[Callable, Callable]:
        def pre(_m, args, kwargs):
            t = flat(_first_tensor(args, kwargs))
            if t is not None:
                ins[i].append((name, t))

        def post(_m, _args, output):
            t = flat(output)
            if t is not None:
                outs[i].append(t)

        return pre, post

    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            pre, post = record(i, name)
            hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            if name:
                hooks.append(module.register_forward_hook(post))
    run_hooked(model, input_ids, hooks)
    out: list[Layer] = []
    for i, layer in enumerate(layers):
        info = Layer()
        weighted = {n for n, m in layer.named_modules() if _is_weighted(m, hidden)}
        rows = ins[i][0][1].shape[0]  # the layer's own input comes first
        for name, t in ins[i]:
            if t.shape[0] != rows:
                continue
            state, form, _ = _classify(t, info.states) if info.states else (-1, "", None)
            if state >= 0 and form == "none":
                info.sources[state].append(name)
                continue
            if state >= 0:
                continue
            if (
                not info.states
                or name not in weighted
                or any(_is_sum(t, s, outs[i]) for s in info.states)
            ):
                info.states.append(t)
                info.sources.append([name])
        derived: list[tuple[torch.Tensor, int, list[Step]]] = []  # normed images of states
        for name, t in ins[i]:
            if t.shape[0] != rows or name in weighted:
                continue
            state, form, gain, bias = _classify_full(t, info.states)
            if state >= 0 and form != "none":
                derived.append((t, state, [Step(form, gain, bias)]))
        for name, t in ins[i]:
            if name not in weighted or name in info.readers:
                continue
            read = _read_of(name, t, info.states, derived, ins[i])
            if read is None:
                if name not in info.unexplained:
                    info.unexplained.append(name)
            else:
                info.readers[name] = read
        out.append(info)
    return out


def _read_of(
    name: str,
    t: torch.Tensor,
    states: list[torch.Tensor],
    derived: list[tuple[torch.Tensor, int, list[Step]]],
    inputs: list[tuple[str, torch.Tensor]],
) -> Read | None:
    """How module `name` with input t reads a raw state: directly, through one norm, or
    through a norm of a normed state (a chain); rows may be a gathered, scaled subset."""
    state, form, gain, bias = _classify_full(t, states)
    if state >= 0:
        return Read(name, state, [] if form == "none" else [Step(form, gain, bias)])
    for d, d_state, d_chain in derived:
        k, form, gain, bias = _classify_full(t, [d])
        if k >= 0 and form != "none":
            return Read(name, d_state, [*d_chain, Step(form, gain, bias)])
    # a gathered subset of rows (one expert's tokens, maybe scaled by their routing weight)
    found = next((f for _, c in inputs if (f := _rows_in(t, c)) is not None), None)
    if found is not None:
        keep, idx = found
        state, form, gain, bias = _classify_full(t[keep], [s[idx] for s in states])
        if state >= 0:
            return Read(name, state, [] if form == "none" else [Step(form, gain, bias)])
    return None


def residual_streams(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering every decoder layer, and leaving the last one."""
    layers = decoder_layers(model)
    seen: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        seen.append(_first_tensor(args, kwargs).detach().clone())

    def post(_m, _a, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(post))
    run_hooked(model, input_ids, hooks)
    assert len(seen) == len(layers) + 1
    return seen


def gains_agree(observed: torch.Tensor | None, table: torch.Tensor | None) -> bool:
    """The table's gain (offset + w, or the LayerNorm weight) is the observed one up to a
    positive factor; both None for a reader that sees the stream itself."""
    if observed is None or table is None:
        return observed is None and table is None
    o, t = observed.double(), table.double()
    cos = (o @ t) / (o.norm() * t.norm()).clamp_min(1e-300)
    return bool(cos > 1 - 1e-6) and math.isfinite(cos.item())


def _floats(out) -> list[torch.Tensor]:
    items = out if isinstance(out, tuple | list) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _input_slot(args: tuple, kwargs: dict) -> tuple[str, int | str]:
    if args and isinstance(args[0], torch.Tensor):
        return "args", 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "kwargs", "hidden_states"
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return "kwargs", key


def perturbed_change(
    model: torch.nn.Module,
    layer: int,
    info: Layer,
    state: int,
    modules: list[str],
    r: torch.Tensor,
) -> dict[str, float]:
    """Add c * r to residual state `state` of decoder layer `layer` (where the modules that take
    it as input receive it) and compare, for each reader in `modules`, its output in that run
    with its output on its unperturbed input rescaled per row: the perturbed input is, per row,
    a multiple of the plain one (the norm's new denominator, a routing weight) plus a multiple
    of r as the reader sees it (u: the gain times r, centred behind a LayerNorm); the second is
    dropped. A reader blind to r gives 0 up to float rounding; one that sees r gives more."""
    block = decoder_layers(model)[layer]
    subs = dict(block.named_modules())
    hidden = r.shape[0]
    sources = info.sources[state]
    seen: dict[str, list] = {m: [] for m in modules}
    plain: list[torch.Tensor] = []

    def grab(name: str):
        def pre(_m, args, kwargs):
            seen[name].append(
                (args, {k: v for k, v in kwargs.items()}, _first_tensor(args, kwargs).clone())
            )

        def post(_m, _a, out):
            seen[name][-1] = (*seen[name][-1], [t.detach().clone() for t in _floats(out)])

        return pre, post

    def run(perturb: float | None) -> dict[str, list]:
        for m in modules:
            seen[m] = []
        hooks = []
        for m in modules:
            pre, post = grab(m)
            hooks.append(subs[m].register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(subs[m].register_forward_hook(post))
        for src in sources:

            def add(_m, args, kwargs, src=src):
                where, key = _input_slot(args, kwargs)
                t = args[key] if where == "args" else kwargs[key]
                flat = t.reshape(-1, hidden)
                if perturb is None:
                    if src == sources[0]:
                        plain.append(flat.detach().clone())
                    return None
                target = plain[0]
                if flat.shape != target.shape or not torch.allclose(flat, target, atol=0, rtol=0):
                    return None  # another call, or already moved upstream
                moved = (flat + perturb * r.to(flat.dtype)).reshape(t.shape)
                if where == "args":
                    return (moved, *args[1:]), kwargs
                return args, {**kwargs, key: moved}

            hooks.append(subs[src].register_forward_pre_hook(add, with_kwargs=True))
        run_hooked(model, IDS_FOR_PERTURBATION, hooks)
        return {m: list(v) for m, v in seen.items()}

    base = run(None)
    s = plain[0].double()  # [N, hidden]
    c = 0.5 * s.norm(dim=-1).mean().item()
    moved = run(c)
    out: dict[str, float] = {}
    for m in modules:
        read = info.readers[m]
        worst = 0.0
        assert len(base[m]) == len(moved[m]), f"{m}: called a different number of times"
        for (_a0, _k0, z0, _o0), (a1, k1, z1, o1) in zip(base[m], moved[m], strict=True):
            want, miss = _without_r(read, r, z0.reshape(-1, hidden), z1.reshape(-1, hidden))
            want = want.reshape(z0.shape)
            where, key = _input_slot(a1, k1)
            args = (want, *a1[1:]) if where == "args" else a1
            kwargs = k1 if where == "args" else {**k1, key: want}
            with torch.no_grad():
                again = _floats(subs[m](*args, **kwargs))
            worst = max(worst, miss)
            for x, y in zip(again, o1, strict=True):
                scale = y.abs().max().clamp_min(1e-30)
                worst = max(worst, ((x - y).abs().max() / scale).item())
        out[m] = worst
    return out


def _without_r(read: Read, r: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> tuple:
    """What a reader would see had the stream not moved along r: per row, z1 - bias = alpha
    (z0 - bias) + beta u, u being r as the reader sees it (through each norm's centring and
    gain), alpha the denominator (and any routing weight). -> (alpha (z0 - bias) + bias in
    z0's dtype, the fit's relative miss)."""
    hidden = z0.shape[-1]
    u = r.double()
    for step in read.chain:
        if step.form.startswith("layernorm"):
            u = u - u.mean()
        u = u * step.gain.double()
    last = read.chain[-1].bias if read.chain else None
    bias = last.double() if last is not None else torch.zeros(hidden).double()
    x0, x1 = z0.double() - bias, z1.double() - bias  # [n, hidden]
    basis = torch.stack([x0, u.expand_as(x0)], dim=-1)  # [n, hidden, 2]
    coef = torch.linalg.lstsq(basis, x1.unsqueeze(-1)).solution  # [n, 2, 1]
    fit = (basis @ coef).squeeze(-1)  # [n, hidden, 2] @ [n, 2, 1] -> [n, hidden]
    miss = ((x1 - fit).norm() / x1.norm().clamp_min(1e-300)).item()
    return (coef[:, 0] * x0 + bias).to(z0.dtype), miss


def _final(model: torch.nn.Module, norm: str, moved: float = 0.0, r=None) -> tuple:
    """One pass: (final norm's input, head's input, head's output) as [N, ...] rows, with
    moved * r added to the final norm's input."""
    hidden = model.config.get_text_config().hidden_size
    head = model.get_output_embeddings()
    got: dict = {}

    def pre(_m, args, kwargs):
        t = _first_tensor(args, kwargs)
        got["x"] = t.detach().reshape(-1, hidden).clone()
        if moved:
            where, key = _input_slot(args, kwargs)
            t = t + moved * r.to(t.dtype)
            return ((t, *args[1:]), kwargs) if where == "args" else (args, {**kwargs, key: t})
        return None

    def head_pre(_m, args):
        got["z"] = args[0].detach().reshape(-1, hidden).clone()

    def head_post(_m, _a, out):
        got["o"] = out.detach().reshape(-1, out.shape[-1]).clone()

    hooks = [
        model.get_submodule(norm).register_forward_pre_hook(pre, with_kwargs=True),
        head.register_forward_pre_hook(head_pre),
        head.register_forward_hook(head_post),
    ]
    run_hooked(model, IDS_FOR_PERTURBATION, hooks)
    return got["x"], got["z"], got["o"]


def head_read(model: torch.nn.Module, norm: str) -> Read:
    """How the output head reads the stream that the final norm `norm` receives."""
    x, z, _ = _final(model, norm)
    state, form, gain, bias = _classify_full(z, [x])
    return Read("head", state, [] if state < 0 or form == "none" else [Step(form, gain, bias)])


def head_change(model: torch.nn.Module, norm: str, read: Read, r: torch.Tensor) -> float:
    """As perturbed_change, for the output head: the final stream moved along r."""
    x0, z0, _ = _final(model, norm)
    c = 0.5 * x0.double().norm(dim=-1).mean().item()
    _, z1, o1 = _final(model, norm, c, r)
    want, _ = _without_r(read, r, z0, z1)
    with torch.no_grad():
        again = model.get_output_embeddings()(want)
    return ((again - o1).abs().max() / o1.abs().max().clamp_min(1e-30)).item()


IDS_FOR_PERTURBATION = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))


MLA = dict(num_key_value_heads=4, qk_head_dim=16)
INDEXER = dict(index_head_dim=16, index_n_heads=2, index_topk=4)
MAMBA = dict(use_mamba_kernels=False)
# model_type -> config overrides beyond SMALL: every decoder family a table covers
ZOO: dict[str, dict] = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "mistral": {},
    "ministral": {},
    "ministral3": {},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "smollm3": {},
    "seed_oss": dict(attention_bias=True),
    "granite": {},
    "apertus": {},
    "ernie4_5": {},
    "hunyuan_v1_dense": {},
    "glm": {},
    "glm4": {},
    "olmo2": {},
    "olmo3": {},
    "exaone4": {},
    "cohere": {},
    "cohere2": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "gemma4_text": dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=128),
    "gemma4_text@moe": dict(
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16
    ),
    "mixtral": {},
    "minimax_m2": {},
    "phimoe": {},
    "qwen2_moe": {},
    "qwen3_moe": dict(mlp_only_layers=[0]),
    "olmoe": {},
    "granitemoe": {},
    "granitemoeshared": {},
    "hunyuan_v1_moe": {},
    "ernie4_5_moe": {},
    "dots1": {},
    "afmoe": {},
    "mimo_v2_flash": {},
    "mistral4": dict(MLA, head_dim=16),
    "deepseek_v2": MLA,
    "deepseek_v3": MLA,
    "deepseek_v32": {**MLA, **INDEXER},
    "glm4_moe": {},
    "glm4_moe_lite": MLA,
    "glm_moe_dsa": {**MLA, **INDEXER},
    "kimi_linear": dict(
        MLA,
        layer_types=["linear_attention", "full_attention"] * 2,
        linear_head_dim=8,
        linear_num_heads=4,
        num_experts_per_token=2,
        num_shared_experts=1,
    ),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "gpt_oss": {},
    "llama4_text": dict(
        num_experts_per_tok=1,
        intermediate_size_mlp=48,
        interleave_moe_layer_step=2,
        no_rope_layers=[1, 1, 1, 1],
    ),
    "jamba": dict(
        MAMBA,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_dt_rank=4,
        mamba_d_state=4,
    ),
    "granitemoehybrid": dict(
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        layer_types=["mamba", "attention"] * 2,
        shared_intermediate_size=16,
    ),
    "nemotron_h": dict(
        MAMBA,
        layers_block_type=["mamba", "moe", "attention", "mlp"],
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=1,
        moe_shared_expert_intermediate_size=16,
    ),
    "falcon_h1": dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8),
    "lfm2": dict(layer_types=["conv", "full_attention"] * 2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2, num_dense_layers=1),
}


def zoo_model(key: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of a ZOO key ("type" or "type@variant")."""
    return build(key.split("@")[0], seed, **ZOO[key])


VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    depth=1,
    num_attention_heads=2,
    num_heads=2,
    image_size=28,
    patch_size=14,
    out_hidden_size=HIDDEN,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=16,
    deepstack_visual_indexes=[],
    position_embedding_size=8,
    pooling_kernel_size=2,
)
# multimodal model type -> the text model's ZOO overrides (its text_config class is the
# multimodal config's own); built with a tiny vision tower, saved under the multimodal prefix
MULTIMODAL: dict[str, dict] = {
    "qwen3_5_moe": ZOO["qwen3_5_moe_text"],
    "qwen3_5": ZOO["qwen3_5_text"],
    "qwen3_vl": {},
    "qwen3_vl_moe": dict(moe_intermediate_size=24),
    "gemma3": {},
    "gemma4": ZOO["gemma4_text"],
    "mistral3": {},
    "mistral_large4": dict(MLA, **INDEXER),
}
# model types a table names that are not built here, with the reason
NOT_BUILT: dict[str, str] = {
    "kimi_k2": "a deepseek_v3 checkpoint under another model_type (the same modules)",
    "kimi_k25": "transformers writes its text layers back as language_model.model.blocks.N "
    "(its vision tower's renaming, reversed); real checkpoints hold ...layers.N, read by the "
    "deepseek table as for deepseek_v3, which is built",
    "llama4": "Llama4ForConditionalGeneration's forward fails on text alone in transformers "
    "5.24 ('image_outputs'); its text model is built as llama4_text and the multimodal prefix "
    "language_model.model. is checked for gemma3",
    "gpt2": "no readers behind a known norm in its table (writers only): tests/test_families",
}


def _sub_classes(model_type: str) -> tuple[type, type]:
    base = transformers.AutoConfig.for_model(model_type)
    return tuple(
        type(getattr(base, k)) if getattr(base, k) is not None else type(base).sub_configs[k]
        for k in ("text_config", "vision_config")
    )


def multimodal_text_type(model_type: str) -> str:
    return _sub_classes(model_type)[0]().model_type


def multimodal_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random image-text model of `model_type` with a tiny vision tower; its text model is
    shrunk and perturbed as `build` does."""
    base = transformers.AutoConfig.for_model(model_type)
    text_cls, vision_cls = _sub_classes(model_type)
    defaults = text_cls().to_dict()
    kw = {k: v for k, v in SMALL.items() if k in defaults or k.endswith("token_id")}
    for key, value in defaults.items():
        if isinstance(value, list) and key.endswith(("layer_types", "_layers")):
            kw[key] = None
    kw.update(MULTIMODAL[model_type])
    vision_keys = vision_cls().to_dict()
    vision = vision_cls(**{k: v for k, v in VISION.items() if k in vision_keys})
    config = type(base)(text_config=text_cls(**kw).to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        text = model.get_decoder() if hasattr(model, "get_decoder") else model
        for name, p in text.named_parameters():
            if p.ndim == 1 or "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.get_input_embeddings().weight.mul_(50.0)
    return model
