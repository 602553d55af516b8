"""Step one: run the model on harmful and harmless prompts and write the .refuse file."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
from tqdm import tqdm

from ablation import __version__, activations, analysis, directions, probe, prompts, refuse, stream
from ablation.errors import AblationError
from ablation.hub import resolve_model
from ablation.system import human_bytes, peak_rss

LOG = logging.getLogger(__name__)
BASIS_SIZE = 8  # directions of the refusal subspace stored per layer (orders pick k <= this)


@dataclass
class MeasureOptions:
    model: str
    output: Path
    harmful: str | None = None
    harmless: str | None = None
    text_field: str = "text"
    max_prompts: int | None = None
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    dtype: str = "auto"
    quantize: str | None = None
    system: str | None = None
    response_prefix: str | None = None
    position: str = "last-prompt"
    projected: bool = True
    keep_projections: bool = True
    require_template: bool = False
    stream_layers: bool | None = None  # None: stream when the model does not fit in memory
    probe: bool = False  # the causal check of the measurement and first edited layer
    probe_prompts: int = 128  # per set, spread evenly over the measure prompts


@dataclass
class MeasureSummary:
    layers: int
    n_harmful: int
    n_harmless: int
    seconds: float
    peak_rss: int
    auroc: dict[int, float]
    streamed: stream.Stats | None = None
    probe: analysis.ProbeReport | None = None

    def lines(self) -> list[str]:
        n = self.n_harmful + self.n_harmless
        out = [
            f"layers     {self.layers}",
            f"prompts    {self.n_harmful} harmful + {self.n_harmless} harmless",
            f"time       {self.seconds:.1f} s ({n / max(self.seconds, 1e-9):.1f} prompts/s)",
            f"peak RSS   {human_bytes(self.peak_rss)}",
        ]
        if self.streamed is not None:
            out.extend(self.streamed.lines())
        if self.auroc:
            best = max(self.auroc, key=lambda k: self.auroc[k])
            out.append(f"separation best AUROC {self.auroc[best]:.3f} at layer {best}")
            out.append("AUROC      " + " ".join(f"{k}:{v:.2f}" for k, v in self.auroc.items()))
        if self.probe is not None and self.probe.outcomes:
            out.append(
                f"probe      {len(self.probe.outcomes)} candidates, {self.probe.openers} "
                f"refusal openers holding {self.probe.base_mass:.3f} of the first token"
            )
            c = analysis.probe_choice(self.probe)
            out.append(
                f"probe pick measurement {c.candidate.measurement} from layer "
                f"{c.candidate.start}: openers {c.opener_mass:.3f}, harmless KL {c.kl:.4f}"
            )
        return out


def _check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise AblationError(f"output {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AblationError(f"output {path}: not writable")


def run(opts: MeasureOptions) -> tuple[refuse.Measurements, MeasureSummary]:
    _check_writable(opts.output)
    harmful, harmful_src = prompts.load(
        opts.harmful, "harmful", "measure", opts.text_field, opts.max_prompts, opts.seed
    )
    harmless, harmless_src = prompts.load(
        opts.harmless, "harmless", "measure", opts.text_field, opts.max_prompts, opts.seed
    )
    model_dir = resolve_model(opts.model)
    streamed = _stream_layers(opts, model_dir)
    start = time.perf_counter()
    if streamed:
        if opts.quantize:
            raise AblationError(
                "--stream-layers runs the checkpoint's own weights; drop --load-in-*"
            )
        tok = activations.load_tokenizer(str(model_dir))
        streamer = stream.Streamer(model_dir, opts.dtype, opts.device)
        model = streamer.model
    else:
        model, tok = activations.load_model(str(model_dir), opts.dtype, opts.device, opts.quantize)
    harmful_ids, templated = activations.encode(
        tok, harmful, opts.system, opts.response_prefix, opts.require_template
    )
    harmless_ids, _ = activations.encode(
        tok, harmless, opts.system, opts.response_prefix, opts.require_template
    )
    pad = activations.pad_id(tok)
    num_experts, top_k = activations.moe_shape(model.config)
    kw = dict(
        pad_id=pad,
        batch_size=opts.batch_size,
        position=opts.position,
        keep_states=opts.keep_projections,
        num_experts=num_experts,
        top_k=top_k,
    )
    report = None
    try:
        if streamed:
            with activations.oom_is_user_error(opts.batch_size):
                got_harmful, got_harmless = stream.collect(
                    streamer, [harmful_ids, harmless_ids], **kw
                )
        else:
            with tqdm(
                total=len(harmful) + len(harmless), unit="prompt", desc="measure", disable=None
            ) as bar:
                got_harmful = activations.collect(model, harmful_ids, progress=bar.update, **kw)
                got_harmless = activations.collect(model, harmless_ids, progress=bar.update, **kw)
        meas, aurocs = assemble(got_harmful, got_harmless, opts.projected)
        if opts.probe:
            sets = (
                probe.spread(harmful_ids, opts.probe_prompts),
                probe.spread(harmless_ids, opts.probe_prompts),
                pad,
                opts.batch_size,
            )
            logits_of = (
                probe.streamed(streamer, *sets) if streamed else probe.in_memory(model, *sets)
            )
            with activations.oom_is_user_error(opts.batch_size):
                report = probe.run(
                    logits_of, meas, analysis.probe_candidates(analysis.layer_metrics(meas))
                )
            meas.metadata["probe"] = report.to_json()
    finally:
        if streamed:
            streamer.close()
    seconds = time.perf_counter() - start
    meas.metadata.update(
        {
            "model": opts.model,
            "model_type": str(getattr(model.config, "model_type", "")),
            "num_layers": str(len(meas.layers)),
            "hidden_size": str(meas.hidden_size),
            "position": opts.position,
            "projected": str(opts.projected).lower(),
            "n_harmful": str(len(harmful)),
            "n_harmless": str(len(harmless)),
            "harmful_source": harmful_src,
            "harmless_source": harmless_src,
            "dtype": str(
                streamer.dtype if streamed else next(model.parameters()).dtype
            ).removeprefix("torch."),
            "mode": "streamed" if streamed else "in-memory",
            "chat_template": str(templated).lower(),
            "system": opts.system or "",
            "response_prefix": opts.response_prefix or "",
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    refuse.save(opts.output, meas)
    rss = psutil.Process().memory_info().rss
    summary = MeasureSummary(
        len(meas.layers),
        len(harmful),
        len(harmless),
        seconds,
        max(rss, peak_rss()),
        aurocs,
        streamer.stats if streamed else None,
        report,
    )
    return meas, summary


def _stream_layers(opts: MeasureOptions, model_dir: Path) -> bool:
    """--stream-layers as given, or (unset) whether the model does not fit in memory."""
    if opts.stream_layers is not None:
        return opts.stream_layers
    if stream.fits(model_dir, opts.device):
        return False
    LOG.warning(
        "model %s does not fit in memory: measuring it one decoder layer at a time "
        "(--stream-layers; --no-stream-layers to load it whole)",
        model_dir,
    )
    return True


def assemble(
    harmful: activations.Collected, harmless: activations.Collected, projected: bool
) -> tuple[refuse.Measurements, dict[int, float]]:
    layers, aurocs = {}, {}
    for layer in range(harmful.sums.shape[0]):
        h_mean, l_mean = harmful.means[layer], harmless.means[layer]
        raw, unit = directions.refusal(h_mean, l_mean, projected)
        if not unit.any():
            LOG.info("layer %d: harmful and harmless means agree; no direction", layer)
        extra = {}
        if harmful.states is not None and harmless.states is not None:
            hp = harmful.states[:, layer].double() @ unit  # [n, hidden] @ [hidden] -> [n]
            lp = harmless.states[:, layer].double() @ unit
            extra = {"harmful_proj": hp.float(), "harmless_proj": lp.float()}
            aurocs[layer] = analysis.auroc(hp, lp)
            basis = directions.subspace(harmful.states[:, layer], l_mean, unit, BASIS_SIZE)
            if basis.shape[0]:
                extra["basis"] = basis.float()
        if layer in harmful.expert_counts:
            extra["experts_harmful"] = harmful.expert_counts[layer].float()
        if layer in harmless.expert_counts:
            extra["experts_harmless"] = harmless.expert_counts[layer].float()
        layers[layer] = refuse.LayerMeasurement(
            h_mean.float(), l_mean.float(), raw.float(), unit.float(), extra
        )
    return refuse.Measurements(layers, {}), aurocs
