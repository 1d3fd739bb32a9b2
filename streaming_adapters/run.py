"""Entry point: ``python -m streaming_adapters.run --config-name RECIPE [key=value ...]``.

Also installed as ``streaming-adapters``; ``streaming-adapters plan ...`` is the pre-flight planner
(``task=plan``).  Works as a plain process and under ``torchrun`` (one node, or multi-node with c10d
rendezvous; see ``launch/``).  Recipes live in ``recipes/`` (installed as ``streaming_adapters.recipes``);
``--config-dir DIR`` adds your own.  Every key is checked against ``streaming_adapters/config.py``
(Hydra strict mode): an unknown key is an error that lists the valid ones.

Each run prints one summary line (rank 0) and writes ``report.json`` (``report.path``; default: inside
``output.path`` for conversions; load_check and plan write one only where ``report.path`` says).  A user's
error prints one message (``verbose=true``: with its traceback) and exits 2; Ctrl-C / SIGTERM exits 130 with
one line per rank saying how to resume; a plan that does not fit exits 3.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
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
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, ValidationError

    from .config import schema_keys

    _register_schema()
    # checkpoint.fabricate.config is a free-form dict (transformers config keys): a new key there needs
    # Hydra's `+`, an existing one must not have it; `++` is both, so users write the plain key.
    overrides = [f"++{o}" if o.startswith("checkpoint.fabricate.config.") else o for o in overrides]
    ctx = initialize_config_dir(os.path.abspath(config_dir or recipes_dir()), version_base="1.3")
    try:
        with ctx:
            return hydra_compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as e:
        raise SystemExit(f"error: no recipe named {config_name!r}: {e}\n"
                         f"recipes: {', '.join(list_recipes())}") from None
    except OverrideParseException as e:
        # Hydra's override grammar refuses some characters in bare values ('=' in a path, e.g.
        # /data/run=1/ckpt); quoted, any value passes through as it is.
        bad = next((o for o in overrides if "=" in o and o.count("=") > 1), overrides[0] if overrides else "")
        key, _, value = bad.partition("=")
        raise SystemExit(f"error: cannot read the override {bad!r} ({str(e).splitlines()[0]})\n"
                         f"what to do: quote the value for Hydra, e.g. {key}=\"'{value}'\"") from None
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


def _launched_rank() -> int:
    """This process's rank as torchrun / srun set it (before any process group exists)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _init_distributed(device: str, headers_only: bool) -> tuple[int, int]:
    """Join the launcher's group, or (a plain process) make a group of one so that every task's code path is
    the same: a DeviceMesh of one rank needs an initialised default group, and without one torch asks for
    RANK / MASTER_ADDR."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # plan / dry_run read headers only: never touch CUDA (they work without a GPU, for any device).
    cuda = device == "cuda" and not headers_only
    if cuda:
        torch.cuda.set_device(local)
    backend = os.environ.get("SA_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    timeout = timedelta(minutes=int(os.environ.get("SA_DIST_TIMEOUT_MIN", "30")))
    if world <= 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


# -- one message per failure ---------------------------------------------------------------------------
_STATE = {"signal": None, "verbose": False, "rank": 0, "world": 1, "task": None}


def _on_signal(signum, frame) -> None:
    """First SIGINT / SIGTERM: stop with KeyboardInterrupt; later ones (torchrun forwards the signal it got
    to every worker, so a Ctrl-C arrives twice) are ignored while the rank winds down."""
    if _STATE["signal"] is not None:
        return
    _STATE["signal"] = signal.Signals(signum).name
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt


def _say_error(text: str, collective: bool) -> None:
    """A collective error (raised on every rank by design: CheckpointError, config errors) is printed by
    rank 0 only; a rank's own error (an OSError on its output) by that rank, named."""
    if collective and _STATE["rank"] != 0:
        return
    prefix = f"[rank {_STATE['rank']}] " if _STATE["world"] > 1 and not collective else ""
    print(f"{prefix}error: {text}", file=sys.stderr, flush=True)


def _interrupted_line() -> str:
    sig = _STATE["signal"] or "SIGINT"
    if _STATE["task"] in ("dequantize_bf16", "fp8_to_nvfp4"):
        hint = ("re-run the same command to resume from the last finished step "
                "(add output.restart=true only to start over)")
    else:
        hint = "nothing was written; re-run the same command"
    prefix = f"[rank {_STATE['rank']}] " if _STATE["world"] > 1 else ""
    return f"{prefix}interrupted ({sig}): {hint}"


def _fail(e: BaseException) -> int:
    """The exit code for an exception that ended the run, after printing its one message."""
    import traceback

    from .errors import CheckpointError

    if _STATE["signal"] is not None or isinstance(e, KeyboardInterrupt):
        # An interrupt may surface as another exception (a collective whose peer already stopped).  Inside a
        # conversion the engine's own handler took the signal (to record the finished steps): its message
        # names it.
        if _STATE["signal"] is None and str(e).startswith("SIGTERM"):
            _STATE["signal"] = "SIGTERM"
        if _STATE["verbose"]:
            traceback.print_exception(e)
        print(_interrupted_line(), file=sys.stderr, flush=True)
        return 130
    if _STATE["verbose"]:
        traceback.print_exception(e)
    if isinstance(e, CheckpointError):
        text = str(e)
        if "restart=True" in text:  # the library's keyword is a recipe key here
            text = text.replace("restart=True", "output.restart=true")
        _say_error(f"{type(e).__name__}: {text}", collective=True)
        return 2
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        _say_error(f"{type(e).__name__}: cannot read or write{where}: {e.strerror or e}\n  what to do: check "
                   "that the folder exists, is writable and has free space (df -h), or pass another output.path /"
                   " report.path", collective=False)
        return 2
    if not _STATE["verbose"]:
        traceback.print_exception(e)  # not a user error: a bug, with its traceback to report
    return 1


def main(argv: list[str] | None = None, *, exit_process: bool = True) -> int:
    """The command line.  ``exit_process=False`` (tests, notebooks): return the exit code instead of ending
    the process on a failure, and put the signal handlers back."""
    import threading

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, _on_signal)
    _STATE.update(signal=None, verbose=False, task=None, rank=_launched_rank(),
                  world=int(os.environ.get("WORLD_SIZE", "1")))
    try:
        return _main(argv)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt included: one line, exit 130
        rc = _fail(e)
    finally:
        if not exit_process:
            for s, h in handlers.items():
                signal.signal(s, h)
    sys.stdout.flush()
    sys.stderr.flush()
    if not exit_process:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() == 1:
            dist.destroy_process_group()
        return rc
    # Skip interpreter teardown (atexit hooks, a process group whose peers are gone, tqdm threads): it can
    # block, and the message is out.
    os._exit(rc)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub_plan = bool(argv) and argv[0] == "plan"
    if sub_plan:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="streaming-adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-name", "-cn", default=None, help="recipe name")
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
    if sub_plan and args.config_name in (None, "plan"):
        args.config_name, extra = "plan", ["task=plan"]
    else:
        extra = ["dry_run=true"] if sub_plan else []  # `plan --config-name fp8_to_nvfp4`: that recipe's plan
    if not args.config_name:
        p.error(f"--config-name is required (recipes: {', '.join(list_recipes())})")
    try:
        cfg = compose(args.config_name, args.overrides + extra, args.config_dir)
    except SystemExit as e:  # every rank composes; one prints
        if _STATE["rank"] == 0:
            print(e.code, file=sys.stderr, flush=True)
        return 2
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    _STATE.update(verbose=bool(cfg.verbose), task=cfg.task)
    from .config import validate
    from .layouts import Layout

    validate(cfg)
    headers_only = cfg.task == "plan" or cfg.dry_run
    if cfg.device == "cuda" and not headers_only:
        import torch

        if not torch.cuda.is_available():
            from .config import ConfigError

            raise ConfigError("device=cuda but this machine (or CUDA_VISIBLE_DEVICES) shows no GPU",
                              expected="a visible CUDA device for each rank",
                              fix="pass device=cpu, or run on a GPU machine (plan and dry_run=true need no GPU)")
    layout = Layout(cfg.parallel.tp, cfg.parallel.dp_shard, cfg.parallel.pp, cfg.parallel.ep)
    rank, world = _init_distributed(cfg.device, headers_only)
    _STATE.update(rank=rank, world=world)
    # benchmark and plan launch or model their own ranks; evaluate splits rows over whatever ranks there are
    if cfg.task not in ("benchmark", "plan", "evaluate") and not cfg.dry_run and layout.world_size != world:
        from .config import ConfigError

        raise ConfigError(
            f"parallel.tp x dp_shard x pp x ep = {cfg.parallel.tp} x {cfg.parallel.dp_shard} x "
            f"{cfg.parallel.pp} x {cfg.parallel.ep} = {layout.world_size}, but the world size is {world}",
            expected=f"the product of parallel.* equal to the number of processes ({world})",
            fix=f"launch {layout.world_size} processes (torchrun --nproc-per-node {layout.world_size}), or set "
                f"parallel.* so that their product is {world} (e.g. parallel.tp={world})")
    from .tasks import run_task, write_report

    result = run_task(cfg, layout)
    path = write_report(cfg, result, rank)
    if rank == 0:
        print(f"report: {path}" if path is not None else
              "report: not written (no output folder: report.path=FILE writes report.json)",
              flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if result.get("fits") is False:
        return 3  # the plan does not fit: the table above says why and which layouts would
    return 0


if __name__ == "__main__":
    sys.exit(main())
