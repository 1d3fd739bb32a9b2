"""Opt-in: install the NeMo hook automatically whenever NeMo is imported in this environment.

    python -m streaming_adapters.integrations.nemo_autoload enable     # writes streaming_adapters_nemo.pth
    python -m streaming_adapters.integrations.nemo_autoload disable
    python -m streaming_adapters.integrations.nemo_autoload status

``enable`` writes a ``.pth`` file into this environment's site-packages.  Python runs it at every start: it
loads this file *by path* (no ``streaming_adapters`` / torch import: ~0.2 ms) and registers a
``sys.meta_path`` finder that does nothing until ``nemo_automodel._transformers.model_init`` is imported; right
after that module executes, ``import streaming_adapters.integrations.nemo`` installs the hook.
``STREAMING_ADAPTERS_NEMO=0`` in the environment turns it off for one run.

Why a ``.pth`` and not an entry point: NeMo 0.7.0 reads one entry-point group, ``nemo_automodel.architectures``,
and only to register *new* architecture names, lazily; it cannot change how Llama or Qwen3 load.  Trade-off:
a ``.pth`` acts on every program of the environment (action at a distance), so it is opt-in; the explicit
import or the recipe's ``streaming_adapters:`` section say what they do where they do it.

This file imports only the standard library at module level.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import sysconfig

TARGET = "nemo_automodel._transformers.model_init"
PTH_NAME = "streaming_adapters_nemo.pth"
ENV = "STREAMING_ADAPTERS_NEMO"


class _InstallAfter(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        import streaming_adapters.integrations.nemo  # noqa: F401  -- installs the hook

    def __getattr__(self, name):
        return getattr(self.loader, name)


class NeMoHookFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of NeMo's ``model_init`` so the hook is installed as soon as it is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET or os.environ.get(ENV, "1") == "0":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _InstallAfter(spec.loader)
        return spec


def register() -> None:
    """Called by the ``.pth`` line at interpreter start (idempotent)."""
    if not any(isinstance(f, NeMoHookFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, NeMoHookFinder())


def pth_path() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def pth_line() -> str:
    """The one line of the ``.pth``: load this file by path (if it still exists) and register the finder."""
    here = os.path.abspath(__file__)
    return (f"import os, importlib.util as _u; _p = {here!r}; _s = os.path.exists(_p) and "
            "_u.spec_from_file_location('streaming_adapters_nemo_autoload', _p); _m = _s and _u.module_from_spec(_s); "
            "_s and (_s.loader.exec_module(_m) or _m.register())\n")


def main(argv: list[str] | None = None) -> int:
    cmd = (argv if argv is not None else sys.argv[1:] or ["status"])[0]
    path = pth_path()
    if cmd == "enable":
        with open(path, "w") as f:
            f.write(pth_line())
        print(f"enabled: {path}")
    elif cmd == "disable":
        if os.path.exists(path):
            os.remove(path)
        print(f"disabled: {path} removed")
    elif cmd == "status":
        print(f"{'enabled' if os.path.exists(path) else 'disabled'}: {path}")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
