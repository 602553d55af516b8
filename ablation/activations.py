"""Running the model: loading it for inference, turning prompts into token ids, and collecting
the residual stream at one position of every prompt, at every layer, in batches."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch

from ablation.checkpoint import check_shard_names
from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

POSITIONS = ("last-prompt", "first-generated")
_LAYER = re.compile(r"layers\.(\d+)\.")


def load_model(
    path: str, dtype: str = "auto", device: str | None = None, quantize: str | None = None
):
    """Inference-only model and tokenizer. On a box with GPUs, device_map="auto" spreads the
    model over GPUs and RAM; on CPU it stays in RAM."""
    import transformers

    kwargs: dict = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise AblationError(
                f"--load-in-{quantize} needs bitsandbytes (pip install bitsandbytes)"
            ) from None
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit"
        )
    if device in (None, "auto"):
        if torch.cuda.is_available():
            kwargs["device_map"] = "auto"
    else:
        kwargs["device_map"] = device
    check_shard_names(Path(path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError:  # a multimodal checkpoint: its text stack is measured
            model = transformers.AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise AblationError(f"model {path}: cannot load ({str(exc).splitlines()[0]})") from exc
    model.eval()
    return model, tokenizer


def load_tokenizer(path: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise AblationError(f"model {path}: cannot load ({str(exc).splitlines()[0]})") from exc


def pad_id(tokenizer) -> int:
    """The id used for left padding: the pad token, else EOS (masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def encode(
    tokenizer,
    prompts: list[str],
    system: str | None = None,
    response_prefix: str | None = None,
    require_template: bool = False,
) -> tuple[list[list[int]], bool]:
    """Token ids of each prompt as a chat turn with the generation prompt (plus an optional
    response prefix), and whether a chat template was used. Exactly one BOS: a template that
    writes BOS itself does not get a second one from the tokenizer."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    if not templated:
        if require_template:
            raise AblationError("the tokenizer has no chat template (--require-template)")
        LOG.warning("the tokenizer has no chat template: prompts are fed as plain text")
    bos, adds_bos = tokenizer.bos_token_id, _adds_bos(tokenizer)
    out = []
    for prompt in prompts:
        if templated:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            try:
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except (jinja2.TemplateError, ValueError) as exc:
                if system and "system" in str(exc).lower():
                    raise AblationError(
                        "the chat template rejects a system message; drop --system"
                    ) from exc
                raise AblationError(f"the chat template failed: {exc}") from exc
            text += response_prefix or ""
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if adds_bos and ids[:1] != [bos]:
                ids = [bos, *ids]
        else:
            text = (f"{system}\n\n" if system else "") + prompt + (response_prefix or "")
            ids = tokenizer(text).input_ids
        out.append(ids)
    return out, templated


@dataclass
class Collected:
    """Per-layer sums (float64) and, when kept, each prompt's state (float32, prompt order)."""

    sums: torch.Tensor  # [layers, hidden]
    count: int
    states: torch.Tensor | None  # [n, layers, hidden]
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    tokens: int = 0

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.count


def _routers(model, num_experts: int | None) -> dict[int, torch.nn.Module]:
    """Router modules by layer: a [num_experts, hidden] weight named gate or router."""
    if not num_experts:
        return {}
    found = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        m = _LAYER.search(name + ".")
        if (
            m
            and isinstance(w, torch.Tensor)
            and w.ndim == 2
            and w.shape[0] == num_experts
            and name.rsplit(".", 1)[-1] in ("gate", "router")
        ):
            found[int(m.group(1))] = module
    return found


def moe_shape(config) -> tuple[int | None, int | None]:
    """(experts per MoE layer, experts chosen per token) from a model's config; (None, None)
    for a dense model."""
    text = config.get_text_config()
    experts = next(
        (
            getattr(text, k)
            for k in ("num_experts", "num_local_experts", "n_routed_experts")
            if isinstance(getattr(text, k, None), int)
        ),
        None,
    )
    return experts, getattr(text, "num_experts_per_tok", None)


class RouterCounts:
    """How often each expert is selected (top-k) per MoE layer, over the real tokens of the
    batch being run (`mask`, padding excluded), by forward hooks on the routers. `counts` is
    the dict being filled; swap it to count several prompt sets in one pass."""

    def __init__(self, model, num_experts: int | None, top_k: int | None) -> None:
        self.num_experts, self.top_k = num_experts or 0, top_k
        self.mask: torch.Tensor | None = None  # [batch * seq] bool
        self.counts: dict[int, torch.Tensor] = {}
        self._hooks = [
            m.register_forward_hook(self._hook(layer))
            for layer, m in _routers(model, num_experts).items()
        ]

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            if self.mask is None:
                return
            idx = _selected(output, self.top_k)
            if idx is None or idx.shape[0] != self.mask.shape[0]:
                return
            flat = idx[self.mask].reshape(-1).cpu()
            n = self.num_experts
            self.counts[layer] = (
                self.counts.get(layer, torch.zeros(n, dtype=torch.float64))
                + torch.bincount(flat, minlength=n).double()
            )

        return hook

    def close(self) -> None:
        for hk in self._hooks:
            hk.remove()


class Accumulator:
    """Per-layer sums and (optionally) each prompt's state, filled batch by batch."""

    def __init__(self, n: int, keep_states: bool) -> None:
        self.n, self.keep_states = n, keep_states
        self.sums: torch.Tensor | None = None
        self.states: torch.Tensor | None = None
        self.tokens = 0

    def add(self, chunk: list[int], h: torch.Tensor, layers: slice = slice(None)) -> None:
        """h: [b, layers, hidden] for the prompts `chunk`, at the layers `layers`."""
        if self.sums is None:
            raise RuntimeError("Accumulator.shape() first")
        self.sums[layers] += h.double().sum(0).cpu()
        if self.states is not None:
            self.states[torch.tensor(chunk), layers] = h.float().cpu()

    def shape(self, layers: int, hidden: int) -> None:
        if self.sums is None:
            self.sums = torch.zeros((layers, hidden), dtype=torch.float64)
            if self.keep_states:
                self.states = torch.zeros((self.n, layers, hidden), dtype=torch.float32)

    def result(self, counts: dict[int, torch.Tensor]) -> Collected:
        if self.sums is None:
            raise AblationError("no prompts to run")
        return Collected(self.sums, self.n, self.states, counts, self.tokens)


@contextmanager
def oom_is_user_error(batch_size: int) -> Iterator[None]:
    """Out of memory (GPU or host) is one line suggesting a smaller batch."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise AblationError(
            f"out of memory at batch size {batch_size}: try a smaller --batch-size"
        ) from exc
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            raise AblationError(
                f"out of memory at batch size {batch_size}: try a smaller --batch-size"
            ) from exc
        raise


def collect(
    model,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    position: str = "last-prompt",
    keep_states: bool = True,
    num_experts: int | None = None,
    top_k: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Collected:
    """Forward passes over length-sorted, left-padded batches; the hidden state of every layer
    at the last prompt token (or at the first generated token) of each prompt."""
    check_position(position)
    device = model.get_input_embeddings().weight.device
    acc = Accumulator(len(seqs), keep_states)
    routers = RouterCounts(model, num_experts, top_k)
    try:
        with torch.inference_mode(), oom_is_user_error(batch_size):
            for chunk in batches(seqs, batch_size):
                ids, mask = pad([seqs[i] for i in chunk], pad_id, device)
                acc.tokens += int(mask.sum())
                routers.mask = mask.reshape(-1).bool()
                h = _states_at(model, ids, mask, position)  # [b, layers, hidden]
                routers.mask = None
                acc.shape(h.shape[1], h.shape[2])
                acc.add(chunk, h)
                if progress:
                    progress(len(chunk))
    finally:
        routers.close()
    return acc.result(routers.counts)


def check_position(position: str) -> None:
    if position not in POSITIONS:
        raise AblationError(f"--position {position!r}: use one of {', '.join(POSITIONS)}")


def _selected(output, top_k: int | None) -> torch.Tensor | None:
    """Selected expert indices [tokens, k] from a router's output, whatever its form."""
    if isinstance(output, tuple):
        ints = [o for o in output if isinstance(o, torch.Tensor) and not o.is_floating_point()]
        if ints:
            return ints[-1].reshape(ints[-1].shape[0], -1)
        output = output[0]
    if isinstance(output, torch.Tensor) and output.is_floating_point() and top_k:
        logits = output.reshape(-1, output.shape[-1])
        return logits.topk(top_k, dim=-1).indices
    return None


def pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):  # left padding: the last token is at column -1 for all
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: real positions despite the padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _states_at(model, ids: torch.Tensor, mask: torch.Tensor, position: str) -> torch.Tensor:
    positions = positions_of(mask)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        output_hidden_states=True,
        use_cache=position == "first-generated",
        logits_to_keep=1,
    )
    if position == "first-generated":
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=positions[:, -1:] + 1,
            past_key_values=out.past_key_values,
            output_hidden_states=True,
            use_cache=True,
            logits_to_keep=1,
        )
    hidden = out.hidden_states[:-1]  # index l: the residual stream entering decoder layer l
    return torch.stack([h[:, -1, :].to(hidden[0].device) for h in hidden], dim=1)


def batches(seqs: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations (new token ids only), batched with left padding, in input order."""
    device = model.get_input_embeddings().weight.device
    out: list[list[int]] = [[] for _ in seqs]
    with torch.inference_mode():
        for chunk in batches(seqs, batch_size):
            ids, mask = pad([seqs[i] for i in chunk], pad_id, device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                top_p=None,
                top_k=None,
                temperature=None,
            )
            for row, i in enumerate(chunk):
                out[i] = gen[row, ids.shape[1] :].tolist()
            if progress:
                progress(len(chunk))
    return out


def next_token_logits(
    model,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Raw logits of the first generated token over the full vocabulary: [n, vocab]."""
    device = model.get_input_embeddings().weight.device
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for chunk in batches(seqs, batch_size):
            ids, mask = pad([seqs[i] for i in chunk], pad_id, device)
            positions = positions_of(mask)
            logits = (
                model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
                .logits[:, -1]
                .float()
                .cpu()
            )
            if out is None:
                out = torch.zeros((len(seqs), logits.shape[-1]), dtype=torch.float32)
            out[torch.tensor(chunk)] = logits
            if progress:
                progress(len(chunk))
    assert out is not None
    return out


TOP_BINS = 256  # answer KL: the base's top tokens kept per position (plus a bin for the rest)


def answer_logprobs(
    model,
    seqs: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    batch_size: int,
    bins: list[torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Teacher-forced next-token log-probabilities along given answers (prompt + answer fed
    at once), compressed per position to bins: the base model's TOP_BINS most likely tokens
    and one bin for the rest of the vocabulary. Without `bins` the top tokens are chosen here
    (the base model's run); with them (the indices from that run) the same bins are read.
    The same pass gives the first answer token's full distribution (the prediction after the
    prompt's last token, what `next_token_logits` computes), so no second pass is needed.
    Returns (first-token log-probabilities [n, vocab], then per answer: logprobs
    [len, bins + 1], indices [len, bins]), in input order; an empty answer gives empty
    tensors."""
    device = model.get_input_embeddings().weight.device
    out_first: torch.Tensor | None = None
    out_lp: list[torch.Tensor] = [torch.zeros(0, TOP_BINS + 1) for _ in seqs]
    out_ix: list[torch.Tensor] = [torch.zeros(0, TOP_BINS, dtype=torch.long) for _ in seqs]
    full = [s + a for s, a in zip(seqs, answers, strict=True)]
    with torch.inference_mode():
        for chunk in batches(full, batch_size):
            keep = max(len(answers[i]) for i in chunk)
            ids, mask = pad([full[i] for i in chunk], pad_id, device)
            positions = positions_of(mask)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1
            ).logits  # [b, keep + 1, vocab]: the predictions after the last keep + 1 tokens
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            if out_first is None:
                out_first = torch.zeros((len(seqs), logp.shape[-1]), dtype=torch.float32)
            for row, i in enumerate(chunk):
                n = len(answers[i])
                out_first[i] = logp[row, keep - n]  # after the prompt's last token
                if n == 0:
                    continue
                lp = logp[row, keep - n : keep]  # [n, vocab]
                ix = (
                    lp.topk(min(TOP_BINS, lp.shape[-1]), dim=-1).indices
                    if bins is None
                    else bins[i]
                )
                top = lp.gather(-1, ix)  # [n, bins]
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))  # [n]
                out_lp[i] = torch.cat([top, rest.unsqueeze(-1)], dim=-1)
                out_ix[i] = ix
            if progress:
                progress(len(chunk))
    assert out_first is not None
    return out_first, out_lp, out_ix
