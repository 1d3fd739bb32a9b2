"""Crash-safe output: build in ``<dst>.partial``, rename to ``<dst>`` only when complete.

Layout of the staging folder while a conversion runs::

    <dst>.partial/
        model-0000i-of-0000N.safetensors   preallocated, headers written first, tensors pwritten by ranks
        .streaming_adapters/plan.json      fingerprint of source + options: a resume must match it
        .streaming_adapters/steps/S.done   step S written and fsynced by every rank

A run killed at any point leaves ``<dst>.partial`` (never a folder that looks complete).  Re-running
the same conversion resumes after the last finished step; the final rename happens once, on rank 0,
after the index, config and copied files are in place and everything is fsynced.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .plan import ConversionPlan

BOOK = ".streaming_adapters"


class OutputExistsError(CheckpointError):
    """The destination already holds a complete checkpoint."""


def staging_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


class StagedOutput:
    """The staging folder of one conversion, opened on every rank."""

    def __init__(self, dst: Path, plan: ConversionPlan) -> None:
        self.dst = Path(dst)
        self.root = staging_path(self.dst)
        self.plan = plan
        self._fds: dict[str, int] = {}
        self.bytes_written = 0

    # -- rank 0 ------------------------------------------------------------------------------------
    def prepare(self, *, overwrite: bool, restart: bool) -> int:
        """Create or validate the staging folder; return how many steps are already done."""
        if self.dst.exists() and not overwrite:
            raise OutputExistsError(
                "the output folder already exists", file=str(self.dst), expected="a new folder",
                fix="pass overwrite=True (recipe: output.overwrite=true) to replace it, or choose another path",
            )
        plan_file = self.root / BOOK / "plan.json"
        if self.root.exists():
            old = json.loads(plan_file.read_text()).get("fingerprint") if plan_file.exists() else None
            if old != self.plan.fingerprint or restart:
                if not restart:
                    raise CheckpointError(
                        "an unfinished conversion with different inputs or options is in the way",
                        file=str(self.root), expected=f"fingerprint {self.plan.fingerprint[:12]}, found "
                        f"{(old or 'none')[:12]}",
                        fix="delete the .partial folder, or pass restart=True to start over",
                    )
                shutil.rmtree(self.root)
        if not self.root.exists():
            (self.root / BOOK / "steps").mkdir(parents=True)
            for name, lay in self.plan.files.items():
                with open(self.root / name, "wb") as f:
                    f.write(lay.header)
                    f.truncate(lay.size)  # sparse until written; every byte is written by some step
            plan_file.write_text(json.dumps({"fingerprint": self.plan.fingerprint,
                                             "steps": len(self.plan.steps)}))
            _fsync_dir(self.root)
        return len(self.done_steps())

    def done_steps(self) -> set[int]:
        d = self.root / BOOK / "steps"
        return {int(p.stem) for p in d.glob("*.done")} if d.exists() else set()

    def mark_done(self, steps: list[int]) -> None:
        """Record finished steps; called after every rank has fsynced their bytes."""
        d = self.root / BOOK / "steps"
        for step in steps:
            (d / f"{step:06d}.done").write_text("ok")
        _fsync_dir(d)

    def finalize(self, index_json: dict[str, Any], extra_json: dict[str, dict], source: Path, overwrite: bool) -> None:
        """Write index/config, copy non-weight files, fsync, then atomically rename into place."""
        for name, data in {"model.safetensors.index.json": index_json, **extra_json}.items():
            (self.root / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        # The source's config.json / hf_quant_config.json describe FP8 and are never copied as they are.
        _copy_other_files(source, self.root, skip=set(extra_json) | {"model.safetensors.index.json", "config.json",
                                                                    "hf_quant_config.json"})
        shutil.rmtree(self.root / BOOK)
        _fsync_tree(self.root)
        if self.dst.exists():
            if not overwrite:
                raise OutputExistsError("the output folder appeared during the conversion", file=str(self.dst),
                                        expected="no folder", fix="choose another path or pass overwrite=True")
            trash = self.dst.with_name(self.dst.name + ".old")
            os.rename(self.dst, trash)
            os.rename(self.root, self.dst)
            shutil.rmtree(trash)
        else:
            os.rename(self.root, self.dst)
        _fsync_dir(self.dst.parent)

    # -- every rank --------------------------------------------------------------------------------
    def pwrite(self, file: str, offset: int, data: memoryview) -> None:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.root / file, os.O_WRONLY)
        pos = 0
        while pos < len(data):
            pos += os.pwrite(fd, data[pos:], offset + pos)
        self.bytes_written += len(data)

    def sync(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Tokenizer, generation config, chat template, ...: everything but the weights and index."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or rel.name.endswith(".safetensors") or str(rel) in skip or rel.parts[0].startswith("."):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)
