"""Calibration test material: an offline word-level tokenizer and calibration files (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from streaming_adapters.models.load import load_fp8_checkpoint

CHAT_TEMPLATE = "<s>{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def write_tokenizer(folder: Path, vocab_size: int = 1001) -> Path:
    """A WordLevel tokenizer over ``<unk> <s> </s> w3 .. w{vocab_size-1}`` (whitespace split, BOS added)
    with a chat template, saved with ``save_pretrained`` into ``folder`` (a checkpoint folder or not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def random_ids(n: int, seq_len: int, vocab_size: int = 1001, seed: int = 0, ragged: bool = True) -> list[list[int]]:
    """``n`` samples of token ids in [3, vocab); lengths vary in [seq_len/2, seq_len] when ``ragged``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g)) if ragged else seq_len
        out.append(torch.randint(3, vocab_size, (length,), generator=g).tolist())
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def whole_model_amax(path, toks, attn: str = "eager", device: str = "cpu") -> dict[str, float]:
    """Reference: the full BF16 model (transformers, eager, filled by the loader), every sample through
    ``model(input_ids, attention_mask)``, a running max |x| per Linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    model.to_empty(device=device)
    load_fp8_checkpoint(model, path, strict=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)
    model.eval()
    amax: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def pre(_m, args, name=name):
                a = args[0].abs().amax()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            mod.register_forward_pre_hook(pre)
    with torch.no_grad():
        for s in toks.samples:
            model(input_ids=s[None].to(device), attention_mask=torch.ones(1, s.numel(), dtype=torch.int64,
                  device=device), use_cache=False)
    return {k: float(v) for k, v in amax.items()}
