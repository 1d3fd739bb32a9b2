"""One notion of "a file of this checkpoint", for shards, config.json, the index, hf_quant_config.json and
the extra files a conversion copies.

* **Names are normalised** before they are used as keys: ``./f.safetensors``, ``f.safetensors/`` and
  ``a//f.safetensors`` are the same file as ``f.safetensors`` / ``a/f.safetensors`` (two spellings of one
  shard in an index would otherwise become two output files with one name).  Absolute names, ``..``,
  NUL bytes, backslashes and empty names are refused by name.
* **Every path is resolved** (symlinks followed) and must stay inside the checkpoint folder -- except a
  link into the Hugging Face hub cache's own ``blobs/`` of the same repository: huggingface_hub stores
  ``models--org--name/snapshots/<rev>/f -> ../../blobs/<sha>``, which is where most checkpoints live.
* **Regular files only**: a device (``/dev/zero``), FIFO or socket is refused, so no read can block or run
  without end; extra files are copied with a size bound (:data:`MAX_EXTRA_FILE_BYTES`).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from pathlib import Path

from ..errors import CheckpointError, UnsafePathError

# tokenizer.json of the largest vocabularies is ~30 MB; chat templates, generation configs are KBs.  1 GiB
# leaves 30x headroom and still stops a file that is not what a checkpoint folder holds (a stray .pth of
# tens of GB would otherwise be copied into every converted output).
MAX_EXTRA_FILE_BYTES = 1 << 30


def normalize_name(rel: object, *, root: Path, source: str) -> str:
    """The canonical spelling of a file name relative to ``root`` (POSIX separators, no ``.``/empty parts)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise UnsafePathError(
            f"file name {rel!r} is not a relative name",
            file=str(rel), expected=f"a relative name inside {root} (named by {source})",
            fix="do not load this checkpoint as it is; a checkpoint is untrusted input. Fix the name in "
            f"{source}",
        )
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafePathError(
            "a file name points outside the checkpoint folder",
            file=rel, expected=f"a relative name inside {root} (named by {source})",
            fix="do not load this checkpoint as it is; a checkpoint is untrusted input. Fix the index "
            "or move the files into the folder",
        )
    return posixpath.join(*parts)


def _hub_blobs(root: Path) -> Path | None:
    """``<cache>/models--org--name/blobs`` when ``root`` is ``.../models--org--name/snapshots/<rev>[/sub]``."""
    for p in (root, *root.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith(("models--", "datasets--")):
            return p.parent.parent / "blobs"
    return None


def resolve(root: Path, rel: str, *, source: str) -> Path:
    """The real path of checkpoint file ``rel`` (already normalised); refuses anything outside ``root``
    (other than the hub cache's blobs of the same repository)."""
    full = (root / rel).resolve()
    inside = root == full or root in full.parents
    blobs = _hub_blobs(root)
    if not inside and not (blobs is not None and full.parent == blobs):
        raise UnsafePathError(
            "a file of the checkpoint is a link that points outside the checkpoint folder",
            file=str(root / rel),
            expected=f"a file inside {root} (or a link into the Hugging Face cache's blobs/ of this "
            f"repository), found a link to {full}",
            fix="do not load this checkpoint as it is; a checkpoint is untrusted input. Copy the real files "
            "into the folder",
        )
    return full


def regular(root: Path, rel: str, full: Path) -> os.stat_result:
    """``stat`` of ``full``; refuses devices, FIFOs, sockets and folders."""
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise CheckpointError(
            "a file of the checkpoint does not exist (or is a broken link)", file=str(root / rel),
            expected=f"{rel} in {root}", fix="re-download the checkpoint; the download is incomplete",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(
            "a file of the checkpoint is not a regular file", file=str(root / rel),
            expected=f"a regular file, found {_kind(st.st_mode)} at {full}",
            fix="remove it from the checkpoint folder (devices, FIFOs and sockets are never read)",
        )
    return st


def checkpoint_file(root: Path, rel: str, *, source: str) -> Path:
    """Resolved path of a regular file of the checkpoint named ``rel`` (normalised by the caller)."""
    full = resolve(root, rel, source=source)
    regular(root, rel, full)
    return full


def optional_file(root: Path, name: str) -> Path | None:
    """config.json & co.: ``None`` when absent, else the checked path (a link outside is refused)."""
    if not os.path.lexists(root / name):
        return None
    return checkpoint_file(root, name, source="the checkpoint folder")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def extra_files(root: Path, skip: set[str]) -> list[str]:
    """Non-weight files to copy with a converted output (tokenizer, generation config, ...): every file under
    ``root`` except ``skip`` (normalised names: the shards, whatever their names, and the index/config),
    ``*.safetensors`` and dot-folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow folder links: nothing outside
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            rel = (rel_dir / f).as_posix()
            if f.startswith(".") or rel.endswith(".safetensors") or rel in skip:
                continue
            out.append(rel)
    return out


def copy_bounded(root: Path, rel: str, dst_file: Path, limit: int = MAX_EXTRA_FILE_BYTES,
                 tmp_dir: Path | None = None) -> None:
    """Copy checkpoint file ``rel`` to ``dst_file`` (written to a temporary name, then renamed: a re-run
    after a kill mid-copy replaces it).  The source must be a regular file of the checkpoint; reading stops
    at ``limit`` bytes (a file that grows while copied cannot run without end)."""
    full = resolve(root, rel, source="the checkpoint folder")
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO never blocks
    except FileNotFoundError:
        regular(root, rel, full)  # names the broken link
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            regular(root, rel, full)
        if st.st_size > limit:
            raise CheckpointError(
                "an extra file of the checkpoint is too large to copy into the output",
                file=str(root / rel), expected=f"at most {limit} bytes, found {st.st_size}",
                fix="move it out of the checkpoint folder (converted outputs copy the tokenizer and small "
                "configs, not other weights)",
            )
        dst_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = (tmp_dir or dst_file.parent) / (dst_file.name + ".copying")
        with open(tmp, "wb") as out:
            left = limit + 1
            while left > 0:
                chunk = os.read(fd, min(1 << 20, left))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
            if left <= 0:
                raise CheckpointError(
                    "an extra file of the checkpoint grew past the copy limit while it was copied",
                    file=str(root / rel), expected=f"at most {limit} bytes",
                    fix="do not convert a checkpoint while it is being written",
                )
            out.flush()
            os.fsync(out.fileno())
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, dst_file)
    finally:
        os.close(fd)


def is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
