"""The recipe schema: every key a recipe or a ``key=value`` override may set, with what it means.

Registered with Hydra's ConfigStore as ``streaming_adapters_schema``; recipes start from it
(``defaults: [streaming_adapters_schema, _self_]``), so a key that is not here is an error (strict mode).
``docs/recipes.md`` is generated from these docstrings (``python -m streaming_adapters.run --docs recipes``), so
the reference cannot drift from the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .errors import CheckpointError
from .calibrate.config import CalibrationConfig
from .quality.config import EvaluateConfig

TASKS = ("load_check", "dequantize_bf16", "fp8_to_nvfp4", "benchmark", "plan", "evaluate")
DEVICES = ("cpu", "cuda")


@dataclass
class FabricateConfig:
    """Fabricate an FP8 checkpoint into ``checkpoint.path`` first (demos, CI; no model hub needed)."""

    family: Optional[str] = None
    """Set to fabricate a checkpoint at ``checkpoint.path`` (rank 0) before the task, unless it exists: llama,
    mistral, ministral3, qwen3, qwen3_moe, deepseek_v3, mixtral, ministral3_vlm. null: no fabrication."""
    format: str = "fp8_block"
    """FP8 format: fp8_block, fp8_block_ue8m0, fp8_block_e8m0, fp8_block_u8, fp8_tensor, ct_tensor,
    ct_channel, ct_group, ct_block, ct_naive_channel, modelopt, fbgemm, bf16."""
    config: dict[str, Any] = field(default_factory=dict)
    """transformers config overrides, e.g. {hidden_size: 1024, num_hidden_layers: 8}."""
    seed: int = 0
    """Seed of the fabricated values."""


@dataclass
class CheckpointConfig:
    path: Optional[str] = None
    """Source checkpoint folder (config.json + *.safetensors)."""
    fabricate: FabricateConfig = field(default_factory=FabricateConfig)


@dataclass
class OutputConfig:
    path: Optional[str] = None
    """Output checkpoint folder (conversion tasks). Built in ``<path>.partial`` and renamed when complete."""
    format: Optional[str] = None
    """NVFP4 output format: compressed-tensors (vLLM, llm-compressor) or modelopt (TensorRT-LLM, vLLM)."""
    overwrite: bool = False
    """Replace an existing complete output (otherwise refused)."""
    restart: bool = False
    """Discard an unfinished ``.partial`` output from different inputs instead of refusing."""
    ignore: list[str] = field(default_factory=list)
    """Extra modules kept out of NVFP4, compressed-tensors' syntax: exact module (or tensor) names and
    ``re:`` regexes (``re:.*mlp\\.gate$``); fnmatch globs still work, with a deprecation warning."""


@dataclass
class ParallelConfig:
    """Layout of the ranks. The product of the four sizes must equal the world size."""

    tp: int = 1
    """Tensor parallel: column-parallel Shard(0) / row-parallel Shard(1) weights, vocab-parallel embeddings."""
    dp_shard: int = 1
    """FSDP-style sharding of every tensor's dim 0 over this many ranks (over TP: _StridedShard)."""
    pp: int = 1
    """Pipeline stages: decoder layers split into this many contiguous stages."""
    ep: int = 1
    """Expert parallel: MoE experts split across this many ranks."""


@dataclass
class IOConfig:
    backend: str = "pread"
    """pread (default: exact byte reads, no readahead, one reusable chunk buffer) or mmap (page-cache views, no
    buffer; a shard truncated during the load can kill the process with SIGBUS)."""
    chunk_mb: int = 64
    """Most FP8 code bytes in flight per rank, whatever the tensor size."""
    readers: int = 8
    """GPU destinations: reader threads feeding the pipeline (reads in flight per rank)."""
    step_mb: float = 1024
    """Conversion: BF16 bytes per step (each rank holds its share of one step)."""
    sync_s: float = 30
    """Conversion: fsync and record finished steps (the resume points) at most this often; 0 = every step."""


@dataclass
class ReportConfig:
    path: Optional[str] = None
    """Where report.json goes. Default: inside output.path (conversions), beside benchmark.md (benchmark);
    load_check and plan write one only when this is given (never into the working folder)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""


@dataclass
class BenchmarkConfig:
    """The side-by-side benchmark (task=benchmark)."""

    shape: str = "llama70b"
    """Layer shapes of the fabricated checkpoint: llama70b, deepseek_v3, mistral_large_123b, tiny."""
    layers: int = 2
    """Decoder layers in the fabricated checkpoint."""
    peers: list[str] = field(default_factory=lambda: ["raw_read", "streaming_adapters", "torch_quantized_reader",
                                                      "transformers_dequantize"])
    """Peers to run side by side: raw_read, streaming_adapters, torch_quantized_reader,
    transformers_dequantize, convert_nvfp4, read_write."""
    nproc: int = 2
    """Ranks per peer run (each peer runs in fresh processes)."""
    cold: bool = False
    """Drop the WHOLE machine's page cache before each timed run (needs root; says so first; the table says
    warm when not possible)."""
    workdir: Optional[str] = None
    """Where the benchmark checkpoint is fabricated (default: a temporary folder)."""


@dataclass
class RunConfig:
    task: str = "load_check"
    """What to run: load_check, dequantize_bf16, fp8_to_nvfp4, benchmark, plan, evaluate."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    io: IOConfig = field(default_factory=IOConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    device: str = "cpu"
    """cpu or cuda (each rank uses cuda:LOCAL_RANK)."""
    dry_run: bool = False
    """Print the pre-flight plan (bytes, shard sizes, memory per rank) and stop; nothing is read."""
    verify: bool = False
    """load_check: compare every shard with a whole-tensor reference; fp8_to_nvfp4: run verify_checkpoint."""
    host_memory_gb: Optional[float] = None
    """Pre-flight: host memory available per rank (default: this machine's total / local ranks)."""
    gpu_memory_gb: Optional[float] = None
    """Pre-flight: GPU memory available per rank (default: the device's total; unknown without a GPU)."""
    verbose: bool = False
    """Print the traceback of an error (by default: one message per failure)."""


def schema_keys(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf key, for error messages and docs/recipes.md."""
    from dataclasses import MISSING

    out = []
    docs = _attribute_docs(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        sub = _dataclass_of(f.type)
        if sub is not None:
            out.extend(schema_keys(sub, key + "."))
        else:
            out.append((key, repr(default), docs.get(f.name, "")))
    return out


def _dataclass_of(tp) -> type | None:
    name = tp if isinstance(tp, str) else getattr(tp, "__name__", "")
    name = name.replace("Optional[", "").rstrip("]")
    return {c.__name__: c for c in (FabricateConfig, CheckpointConfig, OutputConfig, ParallelConfig, IOConfig,
                                    ReportConfig, BenchmarkConfig, CalibrationConfig, EvaluateConfig)}.get(name)


def _attribute_docs(cls) -> dict[str, str]:
    """Docstrings under dataclass fields (PEP 257 attribute docstrings), read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def recipes_markdown(recipes: list[str]) -> str:
    """docs/recipes.md, generated from this schema and the recipe files."""
    from pathlib import Path

    from .run import recipes_dir

    lines = ["# Recipes reference", "",
             "Generated by `python -m streaming_adapters.run --docs recipes` from `streaming_adapters/config.py` and",
             "`recipes/*.yaml`; do not edit by hand (a test checks it is current).", "",
             "Run a recipe: `python -m streaming_adapters.run --config-name NAME [key=value ...]` (or under",
             "`torchrun --nproc-per-node N`, or `launch/torchrun.sh`, or the Slurm files in `launch/slurm/`).",
             "Unknown keys are errors.", "", "## Recipes", ""]
    for name in recipes:
        text = (Path(recipes_dir()) / f"{name}.yaml").read_text()
        first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("#")), "")
        lines.append(f"- `{name}`: {first}")
    lines += ["", "## Keys", "", "| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in schema_keys():
        lines.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


class ConfigError(CheckpointError):
    """A recipe key has a value the task cannot use (a wrong choice, a bad number, an option it ignores)."""


def choices() -> dict[str, tuple]:
    """The valid values of every key that takes one of a fixed set (checked before anything runs)."""
    from .bench.checkpoint import SHAPES
    from .bench.peers import PEERS
    from .calibrate.config import ATTENTIONS
    from .testing.fixtures import FAMILIES, FORMATS

    return {"task": TASKS, "device": DEVICES, "output.format": (None, "compressed-tensors", "modelopt"),
            "io.backend": ("mmap", "pread"), "benchmark.shape": tuple(SHAPES), "benchmark.peers": tuple(PEERS),
            "checkpoint.fabricate.family": (None, *FAMILIES), "checkpoint.fabricate.format": tuple(FORMATS),
            "evaluate.attn_implementation": ATTENTIONS, "calibration.attention": (None, *ATTENTIONS)}


# Keys each task reads besides these (a key a task does not read is refused unless left at its default, so
# that `verify=true` or `output.format=modelopt` is never silently dropped).
_ALWAYS = ("task", "device", "verbose", "report.path", "checkpoint.path", "checkpoint.fabricate.")
_LOAD = ("parallel.", "io.backend", "io.chunk_mb", "host_memory_gb", "gpu_memory_gb")
_CONVERT = ("output.path", "output.overwrite", "output.restart", "parallel.dp_shard", "io.", "report.progress",
            "dry_run", "verify", "host_memory_gb", "gpu_memory_gb")
USED = {
    "load_check": _ALWAYS + _LOAD + ("io.readers", "dry_run", "verify"),
    "plan": _ALWAYS + _LOAD,
    "dequantize_bf16": _ALWAYS + _CONVERT,
    "fp8_to_nvfp4": _ALWAYS + _CONVERT + ("output.format", "output.ignore", "calibration."),
    "benchmark": ("task", "device", "verbose", "report.path", "checkpoint.path", "benchmark.", "io.readers",
                  "io.backend"),
    # evaluate builds its own skeleton and reader per layer: no load plan (parallel.*, io.*, dry_run, the
    # memory keys), no output folder (it writes into evaluate.out_dir), always prints its per-layer lines.
    "evaluate": _ALWAYS + ("evaluate.",),
}
_WHY = {"parallel.": "conversion splits every step over all ranks whatever the layout: use parallel.dp_shard=N "
                     "(N = the number of ranks)",
        "output.format": "only fp8_to_nvfp4 writes a format choice (BF16 output is plain HF safetensors)",
        "output.ignore": "only fp8_to_nvfp4 keeps modules out of NVFP4 (BF16 output converts every tensor)"}
# Why evaluate refuses what users most often carry over from a conversion or load_check command line.
_WHY_EVALUATE = {"parallel.": "evaluate splits the rows over all ranks whatever the layout (launch N processes)",
                 "dry_run": "evaluate has no pre-flight plan; run it on fewer rows (evaluate.samples=N) to try it",
                 "output.path": "evaluate writes no checkpoint: its report.json and layers.svg go to "
                                "evaluate.out_dir"}
# Numbers: (key, smallest valid value, may be null)
_NUMBERS = (("parallel.tp", 1, False), ("parallel.dp_shard", 1, False), ("parallel.pp", 1, False),
            ("parallel.ep", 1, False), ("io.chunk_mb", 1, False), ("io.readers", 1, False),
            ("io.step_mb", 1e-6, False), ("io.sync_s", 0, False), ("benchmark.layers", 1, False),
            ("benchmark.nproc", 1, False), ("host_memory_gb", 1e-6, True), ("gpu_memory_gb", 1e-6, True),
            ("evaluate.samples", 1, True), ("evaluate.seq_len", 1, False), ("evaluate.host_budget_gb", 0, False))


def validate(cfg) -> None:
    """Raise one :class:`ConfigError` listing every bad value of a composed config: unknown choices (with the
    valid ones), numbers out of range, and options the task would ignore."""
    import difflib

    from omegaconf import OmegaConf

    defaults = OmegaConf.structured(RunConfig)

    def get(key, c=cfg):
        v = OmegaConf.select(c, key)
        return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v

    problems = []
    for key, valid in choices().items():
        v = get(key)
        for item in (v if isinstance(v, list) else [v]):
            if item not in valid:
                shown = ", ".join("null" if x is None else str(x) for x in valid)
                close = difflib.get_close_matches(str(item), [str(x) for x in valid], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{key}={item} is not one of: {shown}{hint}")
    for key, low, nullable in _NUMBERS:
        v = get(key)
        if (v is None and not nullable) or (v is not None and v < low):
            problems.append(f"{key}={v} must be >= {low:g}")
    if cfg.task in USED:
        for key, default, _ in schema_keys():
            if key.startswith(USED[cfg.task]) or get(key) == get(key, defaults):
                continue
            why = _WHY.get(key.split(".")[0] + "." if key.startswith("parallel.") else key)
            if cfg.task == "evaluate":
                why = _WHY_EVALUATE.get("parallel." if key.startswith("parallel.") else key)
            if why is None or cfg.task not in ("dequantize_bf16", "fp8_to_nvfp4", "evaluate"):
                why = f"task {cfg.task} does not read it"
                if cfg.task == "benchmark" and key.startswith("parallel."):
                    why += " (benchmark.nproc sets the ranks of each peer)"
            problems.append(f"{key}={get(key)} is ignored by {cfg.task}: {why}")
    if problems:
        listed = "; ".join(problems)
        raise ConfigError(f"invalid recipe values: {listed}",
                          expected="values the task uses (docs/recipes.md lists every key)",
                          fix="fix or drop the named override(s); --cfg prints the composed recipe")
