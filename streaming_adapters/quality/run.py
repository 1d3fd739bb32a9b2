"""``evaluate``: perplexity (and KL / top-1 / per-layer error vs a reference) streamed one decoder layer at a time.

Layer streaming is calibration's (``calibrate.skeleton.Skeleton``: transformers' own classes on meta, one layer
filled by the project's reader at a time; ``calibrate.store.HiddenStore``: the rows' hidden states on the
host, spilled beyond a budget).  Per decoder layer ``i``: fill the model's layer, run the rank's rows through
it (batch 1), free it; with a reference the same for the reference's layer, then compare the two hidden
states of every row.  After the last layer: final norm + lm_head, per-row logits -> NLL / KL / top-1.

Ranks split the rows (``CalibrationTokens.shard``); totals are added in row order (metrics.py), so any world
size gives the same numbers.  The per-layer forward is transformers' own decoder layer with the kwargs its
model passes (Skeleton.layer_kwargs), so the logits are the whole model's bit for bit
(tests/test_evaluate.py::test_streamed_logits_equal_whole_model).

Memory per rank: the embedding + final norm + lm_head, one decoder layer (two with a reference, one after the
other), one row's activations and logits ([S, vocab] BF16 + fp32 log-softmax); hidden states of the rank's
rows (x2 with a reference) on the host within ``host_budget_bytes``, else spilled to ``work_dir``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..calibrate import attention
from ..calibrate.data import CalibrationTokens, load_calibration_tokens
from ..calibrate.forward import forward_rows
from ..calibrate.skeleton import Skeleton
from ..calibrate.store import HiddenStore
from ..dist import all_gather_object, every_rank_raises, rank_and_world
from ..errors import CalibrationDataError
from .emulate import InputScales, add_hooks
from .metrics import reduce_rows, row_hidden_stats, row_logit_stats


class _Model:
    """One checkpoint being streamed: its skeleton, hidden store and (optionally) emulation scales."""

    def __init__(self, checkpoint, dev, group, attn, lengths, budget, work_dir, tag, emulate: bool) -> None:
        self.sk = Skeleton(checkpoint, dev, group, attn)
        with every_rank_raises(group):  # this rank's spill files and its reading of the scales: it alone may fail
            self.store = HiddenStore(lengths, self.sk.hidden_size, budget_bytes=budget, work_dir=work_dir,
                                     pin=dev.type == "cuda", tag=tag)
            self.scales = InputScales(checkpoint) if emulate else None
            if self.scales is not None:
                self.scales.require()
        self.head: tuple[nn.Module, nn.Module] | None = None

    def run_layer(self, i: int, dev: torch.device) -> None:
        layer = self.sk.fill_layer(i)  # collective; a failure there is raised on every rank by the loader
        with every_rank_raises(self.sk.group):  # this rank's rows: it alone may fail (memory, its spill files)
            hooks = add_hooks(self.sk.linear_names(i), self.scales) if self.scales is not None else []
            try:
                forward_rows(layer, self.store, self.sk.layer_kwargs, dev)
            finally:
                for h in hooks:
                    h.remove()
            self.store.advance()
            self.sk.free_layer(i)

    def fill_head(self) -> None:
        """Final norm + lm_head (tied embeddings: the embedding's weight, as transformers ties them)."""
        model, base = self.sk.model, self.sk.base
        norm, head = base.norm, model.get_output_embeddings()
        norm.to_empty(device=self.sk.device)
        names = {n: m for n, m in model.named_modules() if m is norm or m is head}
        tied = getattr(self.sk.config, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings",
                                                                               False)
        if tied:
            head.weight = base.embed_tokens.weight
            names = {n: m for n, m in names.items() if m is norm}
        else:
            head.to_empty(device=self.sk.device)
        self.sk.fill(names)  # the project's reader, as for the layers
        self.head = (norm, head)

    def logits(self, j: int, dev: torch.device) -> torch.Tensor:
        norm, head = self.head
        with torch.no_grad():
            return head(norm(self.store.read(j).to(dev)[None]))[0]

    def close(self) -> None:
        self.sk.stop_prefetch()
        self.store.close()


def as_tokens(tokens, checkpoint, *, tokenizer=None, samples: int | None = None, seq_len: int = 2048
              ) -> CalibrationTokens:
    """Rows to evaluate from: ``CalibrationTokens``; an integer tensor [N, S] or a list of 1-D ones; a plain
    text file (``.txt``, ``.py``, ``.md``: tokenized whole and cut into rows of ``seq_len``); or any
    calibration data file (``calibrate.data``: .jsonl, .safetensors, .pt, a datasets folder)."""
    if isinstance(tokens, CalibrationTokens):
        return tokens
    if isinstance(tokens, torch.Tensor) or isinstance(tokens, (list, tuple)):
        rows = [torch.as_tensor(t).to(torch.int64).reshape(-1) for t in tokens]
        return CalibrationTokens(rows[:samples] if samples else rows, "tensor", max(r.numel() for r in rows))
    path = Path(tokens)
    if path.suffix.lower() in (".txt", ".py", ".md", ".text"):
        from .data import text_rows

        return text_rows(path, tokenizer or checkpoint, samples=samples, seq_len=seq_len)
    return load_calibration_tokens(path, checkpoint=checkpoint, tokenizer=tokenizer, samples=samples or 1 << 30,
                                   seq_len=seq_len) if samples else _all_rows(path, checkpoint, tokenizer, seq_len)


def _all_rows(path, checkpoint, tokenizer, seq_len) -> CalibrationTokens:
    try:  # no count given: every row of the file (load_calibration_tokens refuses fewer than asked)
        return load_calibration_tokens(path, checkpoint=checkpoint, tokenizer=tokenizer, samples=1 << 30,
                                       seq_len=seq_len)
    except CalibrationDataError as e:
        if "fewer than" not in str(e):
            raise
        n = int(str(e).split("holds ")[1].split(" ")[0])
        return load_calibration_tokens(path, checkpoint=checkpoint, tokenizer=tokenizer, samples=n, seq_len=seq_len)


def evaluate(
    checkpoint: str | os.PathLike,
    tokens,
    reference: str | os.PathLike | None = None,
    emulate_activations: bool = False,
    *,
    tokenizer: str | os.PathLike | None = None,
    samples: int | None = None,
    seq_len: int = 2048,
    process_group: dist.ProcessGroup | None = None,
    device: str | torch.device = "cpu",
    host_budget_bytes: int = 32 << 30,
    work_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
    out_dir: str | os.PathLike | None = None,
    keep_logits: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``tokens`` (see :func:`as_tokens`), one decoder layer at a time.

    ``reference``: a second checkpoint (same architecture and vocabulary) streamed in lockstep: adds KL,
    top-1 agreement, the reference's perplexity and per-layer hidden-state error.  ``emulate_activations``:
    W4A4 activation quantize-dequantize with ``checkpoint``'s stored input scales (emulate.py).
    ``out_dir``: rank 0 writes ``report.json`` and ``layers.svg`` there.  Called on every rank of
    ``process_group``; returns the report (every rank the same), plus ``logits`` (this rank's rows, by
    row index) when ``keep_logits``.
    """
    t0 = time.perf_counter()
    rank, world = rank_and_world(process_group)
    dev = torch.device(device)
    with every_rank_raises(process_group):  # a rows file on a node-local disk may be missing on one node only
        toks = as_tokens(tokens, checkpoint, tokenizer=tokenizer, samples=samples, seq_len=seq_len)
    mine = toks.shard(rank, world)
    lengths = [int(toks.samples[j].numel()) for j in mine]
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sa-evaluate-")
        work_dir = tmp.name
    budget = host_budget_bytes // (2 if reference is not None else 1)  # both stores share the budget
    models = [_Model(checkpoint, dev, process_group, attn_implementation, lengths, budget, work_dir,
                     f"model-rank{rank}", emulate_activations)]
    if reference is not None:
        models.append(_Model(reference, dev, process_group, attn_implementation, lengths, budget, work_dir,
                             f"ref-rank{rank}", False))
    m = models[0]
    n_layers = m.sk.num_layers
    layer_seconds: list[float] = []  # this rank's wall time per decoder layer (fill + forward, both models)
    rows: list[dict[str, Any]] = [{"row": j, "positions": float(n), "hidden": []} for j, n in zip(mine, lengths)]
    try:
        # Between collectives (the fills), every stretch of per-rank work ends in every_rank_raises: a rank
        # that fails there takes the others down with it instead of leaving them in the next fill.
        with torch.no_grad(), every_rank_raises(process_group):
            for mod in models:
                for k, j in enumerate(mine):
                    mod.store.write(k, mod.sk.embed(toks.samples[j]))
                mod.store.advance()
        for i in range(n_layers):
            tl = time.perf_counter()
            for mod in models:
                mod.run_layer(i, dev)
            if reference is not None:
                with every_rank_raises(process_group):
                    for k in range(len(mine)):
                        rows[k]["hidden"].append(row_hidden_stats(models[0].store.read(k), models[1].store.read(k)))
            layer_seconds.append(time.perf_counter() - tl)
            if progress and rank == 0:
                print(f"evaluate layer {i + 1}/{n_layers}: {layer_seconds[-1]:.2f} s", flush=True)
        for mod in models:
            mod.fill_head()
        logits = {}
        with every_rank_raises(process_group):
            for k, j in enumerate(mine):
                lg = m.logits(k, dev)
                ref = models[1].logits(k, dev) if reference is not None else None
                rows[k].update(row_logit_stats(lg, toks.samples[j], ref))
                if keep_logits:
                    logits[j] = lg.cpu()
        spilled = m.store.spilled
    finally:
        for mod in models:
            mod.close()
        if tmp is not None:
            tmp.cleanup()
    everyone = sorted((r for part in all_gather_object(rows, process_group) for r in part), key=lambda r: r["row"])
    report = {"checkpoint": str(checkpoint), "reference": str(reference) if reference is not None else None,
              "emulate_activations": emulate_activations, "tokens_sha256": toks.sha256, "seq_len": toks.seq_len,
              "world": world, "spilled": spilled, "attention": attn_implementation,
              "attention_kernel": attention.status(attn_implementation), **reduce_rows(everyone, n_layers),
              "seconds": time.perf_counter() - t0, "layer_seconds": layer_seconds}
    if rank == 0:
        if out_dir is not None:
            write_outputs(report, out_dir)
        if progress:
            print(table(report), flush=True)
    if keep_logits:
        report["logits"] = logits
    return report


def write_outputs(report: dict[str, Any], out_dir) -> dict[str, Path]:
    from .plot import write_svg

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = {"report": d / "report.json"}
    out["report"].write_text(json.dumps({k: v for k, v in report.items() if k != "logits"}, indent=1))
    if report.get("layers"):
        out["plot"] = write_svg(d / "layers.svg", report["layers"], Path(report["checkpoint"]).name)
    return out


def table(report: dict[str, Any]) -> str:
    """The rank-0 summary: totals, then one line per layer when there is a reference."""
    lines = [f"evaluate {report['checkpoint']}: {report['rows']} rows, {report['tokens']} predicted tokens"
             f"{' (W4A4 activations emulated)' if report['emulate_activations'] else ''}",
             f"  perplexity {report['perplexity']:.4f}"]
    if report.get("reference"):
        lines[-1] += (f"   reference {report['ref_perplexity']:.4f}   KL {report['kl']:.5f}   "
                      f"top-1 agreement {100 * report['top1']:.2f}%")
        lines.append(f"  {'layer':>5}  {'cosine':>10}  {'rel L2':>10}")
        lines += [f"  {r['layer']:>5}  {r['cosine']:>10.6f}  {r['rel_l2']:>10.3e}" for r in report["layers"]]
    return "\n".join(lines)
