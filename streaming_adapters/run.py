"""Entry point: ``python -m streaming_adapters.run --config-name RECIPE [key=value ...]``.

Also installed as ``streaming-adapters``; ``streaming-adapters plan ...`` is the pre-flight planner
(``task=plan``).  Works as a plain process and under ``torchrun`` (one node, or multi-node with c10d
rendezvous; see ``launch/``).  Recipes live in ``recipes/`` (installed as ``streaming_adapters.recipes``);
``--config-dir DIR`` adds your own.  Every key is checked against ``streaming_adapters/config.py``
(Hydra strict mode): an unknown key is an error that lists the valid ones.

Each run prints one summary line (rank 0) and writes ``report.json`` (``report.path``, default: inside
``output.path``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from datetime import timedelta

RECIPES_MODULE = "streaming_adapters.recipes"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from .config import RunConfig

    ConfigStore.instance().store(name="streaming_adapters_schema", node=RunConfig)


def compose(config_name: str, overrides: list[str], config_dir: str | None = None):
    """The validated config of a recipe plus overrides (raises ``SystemExit`` with the valid keys)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigKeyError, ValidationError

    from .config import schema_keys

    _register_schema()
    ctx = initialize_config_dir(os.path.abspath(config_dir or recipes_dir()), version_base="1.3")
    try:
        with ctx:
            return hydra_compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as e:
        raise SystemExit(f"error: no recipe named {config_name!r}: {e}\n"
                         f"recipes: {', '.join(list_recipes())}") from None
    except (ConfigCompositionException, ConfigKeyError, ValidationError) as e:
        keys = [k for k, _, _ in schema_keys()]
        msg = str(e.__cause__ or e)
        bad = next((o.split("=")[0].lstrip("+~") for o in overrides if o.split("=")[0].lstrip("+~") not in keys), None)
        hint = f"\nclose matches for {bad!r}: {difflib.get_close_matches(bad, keys, n=3)}" if bad else ""
        raise SystemExit(f"error: {msg}{hint}\nvalid keys:\n  " + "\n  ".join(keys)) from None


def recipes_dir() -> str:
    """The installed ``streaming_adapters.recipes`` package, or ``recipes/`` of a source checkout used
    without installing (``PYTHONPATH=.``)."""
    # A source checkout's own recipes/ first: with PYTHONPATH=<checkout> over an editable install of another
    # tree, the installed mapping would serve that other tree's recipes.
    local = Path(__file__).resolve().parent.parent / "recipes"
    if (local / "__init__.py").exists():
        return str(local)
    try:
        from importlib.resources import files

        return str(files(RECIPES_MODULE))
    except ModuleNotFoundError:
        return str(local)


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in Path(recipes_dir()).iterdir() if p.name.endswith(".yaml"))


def _init_distributed(device: str) -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    backend = os.environ.get("SA_DIST_BACKEND") or ("nccl" if device == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("SA_DIST_TIMEOUT_MIN", "30"))))
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub_plan = bool(argv) and argv[0] == "plan"
    if sub_plan:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="streaming-adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-name", "-cn", default="plan" if sub_plan else None, help="recipe name")
    p.add_argument("--config-dir", "-cd", default=None, help="a folder of your own recipes")
    p.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.add_argument("--docs", choices=["recipes", "troubleshooting"],
                   help="print a generated doc (docs/recipes.md, docs/troubleshooting.md)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(list_recipes()))
        return 0
    if args.docs:
        from ._docs import troubleshooting_markdown
        from .config import recipes_markdown

        print(recipes_markdown(list_recipes()) if args.docs == "recipes" else troubleshooting_markdown(), end="")
        return 0
    if not args.config_name:
        p.error(f"--config-name is required (recipes: {', '.join(list_recipes())})")
    overrides = args.overrides + (["task=plan"] if sub_plan else [])
    cfg = compose(args.config_name, overrides, args.config_dir)
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from .config import TASKS

    if cfg.task not in TASKS:
        raise SystemExit(f"error: task={cfg.task!r} is not one of {TASKS}")
    from .layouts import Layout

    layout = Layout(cfg.parallel.tp, cfg.parallel.dp_shard, cfg.parallel.pp, cfg.parallel.ep)
    rank, world = _init_distributed(cfg.device)
    if cfg.task not in ("benchmark", "plan", "evaluate") and not cfg.dry_run and layout.world_size != world:
        raise SystemExit(
            f"error: parallel.tp x dp_shard x pp x ep = {cfg.parallel.tp} x {cfg.parallel.dp_shard} x "
            f"{cfg.parallel.pp} x {cfg.parallel.ep} = {layout.world_size}, but the world size is {world}. "
            f"Launch {layout.world_size} processes (torchrun --nproc-per-node {layout.world_size}), or set "
            f"parallel.* so that their product is {world} (e.g. parallel.tp={world})"
        )
    from .errors import CheckpointError
    from .tasks import run_task, write_report

    try:
        result = run_task(cfg, layout)
    except CheckpointError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    path = write_report(cfg, result, rank)
    if path is not None:
        print(f"report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
