"""The model to calibrate: transformers' own classes built on the meta device, a layer at a time real.

Built from the checkpoint's config.json (the text model of a VLM), no KV cache, in eval mode, with the
attention each producer calibrates with: ``"eager"`` for compressed-tensors (llm-compressor's
``calibration_forward_context``, formats.md §4), ``"sdpa"`` for ModelOpt (it calibrates the model as
``from_pretrained`` builds it, transformers' default; the two differ by a BF16 ulp in some activations).  Only the
embedding and the rotary embedding are materialized for the whole run; decoder layer ``i`` is
materialized by :meth:`Skeleton.fill_layer` (``to_empty`` + the project's FP8 reader, bit-exact BF16) and
returned to meta by :meth:`Skeleton.free_layer`.

The keyword arguments a decoder layer takes (causal mask, rotary cos/sin, position ids) depend only on the
sequence length here (batch 1, no padding): :meth:`layer_kwargs` captures them from the model's own forward
(a pre-hook on layer 0 stops it), as llm-compressor's sequential pipeline captures the first layer's inputs,
and keeps a few lengths cached (an eager mask is S^2 BF16: 8 MiB at S = 2048).

Memory: the embedding (vocab x hidden BF16), one decoder layer, a few cached masks.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dist import every_rank_raises
from ..errors import CheckpointError
from ..models.families import get_family
from ..models.load import load_fp8_checkpoint
from ..read.prefetch import PageCachePrefetch
from . import attention
from .config import ATTENTIONS

_KWARGS_CACHE = 4  # distinct sequence lengths whose layer kwargs are kept (each up to S^2 BF16 of mask)


class _StopForward(Exception):
    pass


class Skeleton:
    """The meta-device causal LM of a checkpoint, filled one decoder layer at a time."""

    def __init__(self, checkpoint: str | Path, device: torch.device, process_group: dist.ProcessGroup | None = None,
                 attn_implementation: str = "eager", moe_all_experts: bool = True):
        # Everything before the embedding's fill (the first collective) is this rank's own reading of
        # config.json and transformers' model class: a node that cannot must not leave the others in that fill.
        with every_rank_raises(process_group):
            self._build(checkpoint, device, process_group, attn_implementation, moe_all_experts)
        self._materialize_embeddings()

    def _build(self, checkpoint, device, process_group, attn_implementation, moe_all_experts) -> None:
        """This rank's part: config.json, the family, transformers' model on the meta device, its layers."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if attn_implementation not in ATTENTIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTIONS} (got {attn_implementation!r})")
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.group = process_group
        raw = json.loads((self.checkpoint / "config.json").read_text())
        self.family = get_family(raw)
        self.mapper = self.family.mapper()
        self._prefetch: PageCachePrefetch | None = None
        self._ranges: dict[int, list[tuple[Path, int, int]]] | None = None
        config = AutoConfig.from_pretrained(str(self.checkpoint), local_files_only=True)
        config = copy.deepcopy(config.get_text_config())
        # The model is built in BF16 and filled by our reader: transformers must not set up its FP8 quantizer.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.use_cache = False
        self.config = config
        with torch.device("meta"):
            # eager on CUDA: the model's own eager attention with its softmax in one Triton pass, same bits
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16, attn_implementation=attention.implementation(attn_implementation, device))
        from .moe import linearize_experts

        linearize_experts(self.model, moe_all_experts)  # per-expert nn.Linear: hooks see each expert's input
        self.model.eval()
        self.base = self.model.get_decoder()
        self.layers: nn.ModuleList = self.base.layers
        self.prefix = _prefix_of(self.model, self.layers)
        self._kwargs: OrderedDict[int, dict[str, Any]] = OrderedDict()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    # -- fill / free ---------------------------------------------------------------------------------
    def fill(self, modules: dict[str, nn.Module]) -> None:
        """Fill ``modules`` (model name -> materialized module: a decoder layer, the embedding, the final norm)
        from the checkpoint with the project's loader (``load_fp8_checkpoint``: its load plan, one part per
        decoder layer).  Collective over the skeleton's process group."""
        root = nn.Module()
        for name, mod in modules.items():
            parent = root
            parts = name.split(".")
            for p in parts[:-1]:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            parent.add_module(parts[-1], mod)
        rep = load_fp8_checkpoint(root, self.checkpoint, process_group=self.group, key_mapper=self.mapper,
                                  strict=False)
        if rep.missing:
            raise CheckpointError(f"{len(rep.missing)} model tensor(s) have no source in the checkpoint "
                                  f"(examples={rep.missing[:3]})", file=str(self.checkpoint), tensor=rep.missing[0],
                                  expected="every tensor of the decoder layer in the checkpoint",
                                  fix="check that config.json matches the checkpoint's tensors")

    def _materialize_embeddings(self) -> None:
        emb = self.base.embed_tokens
        emb.to_empty(device=self.device)
        self.fill({f"{self.prefix[: -len('layers')]}embed_tokens": emb})
        # Rotary inv_freq is a non-persistent buffer computed at construction: build it again for real.
        rot = getattr(self.base, "rotary_emb", None)
        if rot is not None:
            with torch.device("cpu"):  # computed on the host, as from_pretrained does, then moved
                self.base.rotary_emb = type(rot)(config=self.config).to(self.device)

    def fill_layer(self, i: int) -> nn.Module:
        """Materialize and fill decoder layer ``i``, then start reading layer ``i + 1``'s stored bytes into the
        page cache (``read.prefetch``) so that they arrive while this layer computes."""
        layer = self.layers[i]
        layer.to_empty(device=self.device)
        self.stop_prefetch()  # layer i's own prefetch, if still running: the fill reads the rest itself
        self.fill({f"{self.prefix}.{i}": layer})
        if i + 1 < self.num_layers:
            self._prefetch = PageCachePrefetch(self._layer_ranges().get(i + 1, []))
        return layer

    def free_layer(self, i: int) -> None:
        self.layers[i].to(torch.device("meta"))

    def stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None

    def _layer_ranges(self) -> dict[int, list[tuple[Path, int, int]]]:
        """Stored byte ranges (file, begin, end) of each decoder layer of the checkpoint, by layer index: the
        tensors the family's ``layer_of`` puts under the layer prefix holding ``num_layers`` layers and the most
        tensors (a VLM's vision tower has layers too)."""
        if self._ranges is None:
            index = self._index()
            by_prefix: dict[str, dict[int, list[tuple[Path, int, int]]]] = {}
            for name, t in index.tensors.items():
                where = self.family.layer_of(name)
                if where is not None:
                    by_prefix.setdefault(where[0], {}).setdefault(where[1], []).append(
                        (index.file_path(t.file), t.begin, t.end))
            fits = [v for v in by_prefix.values() if len(v) == self.num_layers]
            self._ranges = max(fits, key=lambda v: sum(map(len, v.values()))) if fits else {}
        return self._ranges

    def linear_names(self, i: int) -> dict[str, nn.Linear]:
        """Checkpoint module name -> the ``nn.Linear`` of layer ``i`` (the modules hooks go on)."""
        from ..models.plan import _Ckpt  # the loader's view of the checkpoint names

        out = {}
        logical = self._logical()
        for name, mod in self.layers[i].named_modules():
            if isinstance(mod, nn.Linear):
                key = f"{self.prefix}.{i}.{name}.weight"
                parts = self.mapper.parts(key, tuple(mod.weight.shape), _Ckpt(logical))
                if parts and len(parts) == 1:
                    out[parts[0].ckpt_key[: -len(".weight")]] = mod
        return out

    def _index(self):
        """The checkpoint's headers, parsed once for the prefetch ranges and the Linear names."""
        if not hasattr(self, "_index_cache"):
            from ..checkpoint.index import CheckpointIndex

            self._index_cache = CheckpointIndex.open(self.checkpoint)
        return self._index_cache

    def _logical(self):
        if not hasattr(self, "_logical_cache"):
            from ..formats import get_adapter

            self._logical_cache = get_adapter(self.checkpoint, index=self._index()).plan.logical
        return self._logical_cache

    # -- inputs --------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[S] ids -> [S, hidden] BF16 (the model's own embedding, incl. any scaling it applies)."""
        return self.base.embed_tokens(ids.to(self.device)[None])[0]

    @torch.no_grad()
    def layer_kwargs(self, seq_len: int) -> dict[str, Any]:
        """The keyword arguments the model passes its decoder layers for one sample of ``seq_len`` tokens."""
        if seq_len in self._kwargs:
            self._kwargs.move_to_end(seq_len)
            return self._kwargs[seq_len]
        captured: dict[str, Any] = {}

        def grab(_mod, args, kwargs):
            captured.update(kwargs)
            raise _StopForward

        h = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            x = torch.zeros(1, seq_len, self.hidden_size, dtype=torch.bfloat16, device=self.device)
            mask = torch.ones(1, seq_len, dtype=torch.int64, device=self.device)  # llm-compressor passes it
            self.base(inputs_embeds=x, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            h.remove()
        captured.pop("hidden_states", None)
        self._kwargs[seq_len] = captured
        while len(self._kwargs) > _KWARGS_CACHE:
            self._kwargs.popitem(last=False)
        return captured


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise CheckpointError("the model has no decoder layer list", expected="model.layers",
                          fix="this model family is not supported by calibration (docs/calibration.md)")
