"""One pattern syntax for module lists: compressed-tensors' (``ignore`` / ``targets``), used both for what a
checkpoint's config names and for what a user keeps out of NVFP4 (``convert_checkpoint(ignore=)``,
recipe ``output.ignore``):

    model.layers.0.mlp.gate        an exact module name (or, in ``ignore=``, its tensor name ``....weight``)
    re:.*mlp\\.gate$                a Python regex, ``re.match``-ed against the module name (anchored at the
                                   start only, as compressed-tensors' ``match_name`` does)

What each side accepted before still works for now, with a ``DeprecationWarning`` that shows the new
spelling: fnmatch globs in ``ignore=`` (``*``, ``?``, ``[...]``: no module name contains them) and, in
configs, a module name matching everything below it (``model.visual`` for ``model.visual.blocks.0...``,
which compressed-tensors itself would not match).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import ScaleLayoutError

_GLOB = re.compile(r"[*?\[]")


class IgnorePatternError(ScaleLayoutError):
    """An ``re:`` pattern that is not a valid Python regular expression."""


def glob_as_regex(glob: str) -> str:
    """The ``re:`` spelling of an fnmatch glob (``model.layers.*.mlp`` -> ``re:model\\.layers\\..*\\.mlp$``);
    a glob with ``[...]`` sets falls back to ``fnmatch.translate``."""
    if "[" in glob:
        return "re:" + fnmatch.translate(glob)
    return "re:" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob) + "$"


@dataclass
class ModulePatterns:
    """A compiled list of patterns.  ``where``: the file or option the list came from (named in errors and
    warnings); ``legacy``: the old syntax this caller accepted, ``"glob"`` (convert's ``ignore=``) or
    ``"prefix"`` (formats' config targets)."""

    items: list[str]
    where: str = "ignore"
    legacy: str = "glob"
    _compiled: list[tuple[str, object, str]] = field(default_factory=list, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        for item in self.items or ():
            if item.startswith("re:"):
                try:
                    self._compiled.append(("re", re.compile(item[3:]), item))
                except re.error as e:
                    raise IgnorePatternError(
                        f"pattern {item!r} is not a valid regular expression ({e})", file=self.where,
                        tensor=item, expected="'re:<python regex>' (re.match on the module name) or an exact "
                        "module name, as compressed-tensors' ignore / targets",
                        fix="repair the pattern (e.g. 're:.*mlp\\.gate$'), or list the module names",
                    ) from None
            elif _GLOB.search(item) and self.legacy == "glob":
                warnings.warn(
                    f"{self.where}: the fnmatch pattern {item!r} is deprecated; write '{glob_as_regex(item)}' "
                    "(compressed-tensors' syntax: exact module names or 're:' regexes)",
                    DeprecationWarning, stacklevel=4)
                self._compiled.append(("glob", item, item))
            else:
                self._compiled.append(("name", item, item))

    def matches(self, module: str, tensor: str | None = None) -> bool:
        """Whether any pattern names ``module`` (or, exactly, its ``tensor``)."""
        for kind, p, item in self._compiled:
            if kind == "re" and p.match(module):  # type: ignore[union-attr]
                return True
            if kind == "glob" and fnmatch.fnmatchcase(module, p):  # type: ignore[arg-type]
                return True
            if kind == "name":
                if module == p or (tensor is not None and tensor == p):
                    return True
                if self.legacy == "prefix" and module.startswith(p + "."):  # type: ignore[operator]
                    self._warn_prefix(item)
                    return True
        return False

    def _warn_prefix(self, item: str) -> None:
        if item not in self._warned:
            self._warned.add(item)
            warnings.warn(
                f"{self.where}: {item!r} matches the modules below it by prefix, which is deprecated "
                f"(compressed-tensors matches exact names only); write 're:{re.escape(item)}\\.'",
                DeprecationWarning, stacklevel=3)


def compile_patterns(items: Iterable[str] | None, *, where: str = "ignore", legacy: str = "glob") -> ModulePatterns:
    return ModulePatterns(list(items or ()), where=where, legacy=legacy)
