"""Crash-safe, owned and locked output: build in ``<dst>.partial``, rename to ``<dst>`` only when complete.

Layout of the staging folder while a conversion runs::

    <dst>.partial/
        model-0000i-of-0000N.safetensors   preallocated, headers written first, tensors pwritten by ranks
        .streaming_adapters/owner.json     made by this project for <dst>: the only folder restart may delete
        .streaming_adapters/lock           flock()ed by rank 0 for the whole run; holds the holder's identity
        .streaming_adapters/plan.json      fingerprints of the options and of the source's content
        .streaming_adapters/steps/S.done   step S written and fsynced by every rank
        .streaming_adapters/steps/rRofW.json  steps rank R of W had fsynced when it was interrupted
        .streaming_adapters/commit.json    written once the output is complete and fsynced (commit point)

The commit sequence (rank 0), each step a kill point (``KILL_POINTS``; tests SIGKILL a real process at
each): write index/config, copy extra files -> fsync all -> commit.json -> [overwrite: rename the old
<dst> to <dst>.old] -> rename <dst>.partial to <dst> -> fsync the parent -> remove <dst>.old -> remove the
bookkeeping folder (owner.json last).  Before commit.json a re-run redoes the finalisation (every write
there is a replace); after it a re-run finishes the remaining renames and removals: the result is always
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from ..checkpoint import files as ckfiles
from ..errors import CheckpointError
from .plan import ConversionPlan

BOOK = ".streaming_adapters"
OWNER = "owner.json"
TOOL = "streaming_adapters"
KILL_ENV = "STREAMING_ADAPTERS_TEST_KILL_AT"
KILL_POINTS = ("prepared", "step-done", "step-synced", "finalize-written", "finalize-copied", "committed", "old-moved",
               "renamed", "parent-synced", "old-removed", "book-partly-removed")


class OutputExistsError(CheckpointError):
    """The destination already holds a complete checkpoint."""


class OutputLockedError(CheckpointError):
    """Another conversion holds the lock of this destination's staging folder."""


class UnsafeOutputError(CheckpointError):
    """The destination overlaps the source, or a folder this project did not make is in the way."""


class OutputWriteError(CheckpointError):
    """The destination cannot be written: read-only, full, or a file where a folder must be."""


class ResumeRefusedError(CheckpointError):
    """An unfinished conversion exists, but for other options or another content of the source."""


def staging_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Tests: signal this process at point ``name``.  ``$STREAMING_ADAPTERS_TEST_KILL_AT`` is
    ``name[@k][:SIG]``: the k-th time the point is reached (default 1), signal SIG (default KILL: a real
    SIGKILL, nothing runs after it; INT/TERM test the interrupt path, USR1 lets a test act mid-run)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, sig = spec.partition(":")
    point, _, k = point.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(k or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def identity(src: Path | None, dst: Path) -> dict[str, Any]:
    """Who holds a destination: enough to find the job (host, pid, scheduler job id) and what it does."""
    job = next((os.environ[k] for k in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "TORCHELASTIC_RUN_ID")
                if os.environ.get(k)), None)
    return {"tool": TOOL, "host": socket.gethostname(), "pid": os.getpid(), "job": job,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "src": str(src), "dst": str(dst)}


def check_not_overlapping(src: Path, dst: Path) -> None:
    """dst equal to, inside, or containing src (or its staging folder doing so) would destroy the source."""
    s = src.resolve()
    for d in (dst.resolve(), staging_path(dst).resolve()):
        if d == s or s in d.parents or d in s.parents:
            raise UnsafeOutputError(
                "the output folder overlaps the source checkpoint",
                file=str(dst), expected=f"an output folder outside {s} that does not contain it",
                fix="choose an output path next to the source, not the source itself or a folder inside/above it",
            )


def write_error(e: OSError, path: Path, doing: str) -> OutputWriteError:
    """An OSError of the destination as a named error whose fix fits its cause."""
    why = os.strerror(e.errno or 0)
    if ckfiles.is_enospc(e):
        return OutputWriteError(
            f"cannot write the output: {doing} failed ({why})", file=str(path),
            expected="enough free space (and quota) for the output",
            fix="free space on that filesystem, then re-run the same command: it resumes from the last finished step")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputWriteError(
            f"cannot write the output: {doing} failed ({why})", file=str(path), expected="a writable folder",
            fix="choose a writable output path (recipe: output.path=..., Python: dst), or fix the folder's permissions")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return OutputWriteError(
            f"cannot write the output: {doing} failed ({why})", file=str(path), expected="folders, not files, on the path",
            fix="a file is in the way of the output folder: move it, or choose another output path")
    return OutputWriteError(
        f"cannot write the output: {doing} failed ({why})", file=str(path), expected="a working output filesystem",
        fix="check the output filesystem, then re-run the same command (it resumes from the last finished step)")


class StagedOutput:
    """The staging folder of one conversion, opened on every rank."""

    def __init__(self, dst: Path, plan: ConversionPlan, src: Path | None = None) -> None:
        self.dst = Path(dst).absolute()
        if not self.dst.name or self.dst.name in (".", ".."):
            raise OutputWriteError("the output path has no folder name", file=str(dst),
                                   expected="a path ending in the new folder's name", fix="name the output folder")
        self.root = staging_path(self.dst)
        self.plan = plan
        self.src = Path(src) if src is not None else Path(plan.source)
        self._fds: dict[str, int] = {}
        self._lock = None  # the open lock file (a file object: garbage collection releases the flock)
        self.bytes_written = 0
        self.committed = False  # True when prepare() found and finished an interrupted commit

    # -- rank 0 ------------------------------------------------------------------------------------
    def prepare(self, *, overwrite: bool, restart: bool) -> int:
        """Check, lock and create or validate the staging folder; return how many steps are already done."""
        check_not_overlapping(self.src, self.dst)
        if os.path.lexists(self.dst) and not self.dst.is_dir():
            raise OutputWriteError("a file is where the output folder must be", file=str(self.dst),
                                   expected="a folder or nothing", fix="move the file away or choose another path")
        if self.dst.is_dir():
            book = self.dst / BOOK
            if self._ours(book):  # killed after the rename: the output is complete; finish the commit
                self._lock_in(book)
                same = (_read_json(book / "plan.json") or {}).get("fingerprint") == self.plan.fingerprint
                self._finish_commit(self.dst)
                if same:
                    self.committed = True
                    return len(self.plan.steps)
            if book.is_dir() and not any(book.iterdir()):
                os.rmdir(book)  # killed after the last removal but before rmdir (rmdir removes only empty)
            if not overwrite:
                raise OutputExistsError(
                    "the output folder already exists", file=str(self.dst), expected="a new folder",
                    fix="pass overwrite=True (recipe: output.overwrite=true) to replace it, or choose another path",
                )
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, self.dst.parent, "creating the output's parent folder") from None
        self._sweep_private()
        if not os.path.lexists(self.root):
            self._create()
        if not self._ours(self.root / BOOK):
            raise UnsafeOutputError(
                "a folder not made by this conversion tool is where the staging folder must be",
                file=str(self.root), expected=f"nothing, or a staging folder made for {self.dst}",
                fix="move that folder away (it is never deleted, even with restart=True), or choose another path",
            )
        self._lock_in(self.root / BOOK)
        plan_file = self.root / BOOK / "plan.json"
        old = _read_json(plan_file)
        want = {"fingerprint": self.plan.fingerprint, "source": self.plan.source_fingerprint,
                "steps": len(self.plan.steps)}
        if old is not None and (old.get("fingerprint"), old.get("source")) != (want["fingerprint"], want["source"]):
            if not restart:
                what = ("the source checkpoint's files changed since it started (same names, other content)"
                        if old.get("fingerprint") == want["fingerprint"] else "different inputs or options")
                raise ResumeRefusedError(
                    f"an unfinished conversion with {what} is in the way",
                    file=str(self.root), expected=f"fingerprint {want['fingerprint'][:12]}/{want['source'][:12]}, "
                    f"found {str(old.get('fingerprint'))[:12]}/{str(old.get('source'))[:12]}",
                    fix="pass restart=True (recipe: output.restart=true) to start over, or convert the source "
                    "it was started from",
                )
        if old is None or old != want or restart:
            self._reset(want)
        return len(self.done_steps())

    def _create(self) -> None:
        """Make the staging folder atomically: built under a private name with the owner marker and the lock
        held, then renamed into place (a second job racing here finds it owned and locked)."""
        tmp = self.root.with_name(f"{self.root.name}.new-{socket.gethostname()}-{os.getpid()}")
        try:
            (tmp / BOOK / "steps").mkdir(parents=True)
            _write_json(tmp / BOOK / OWNER, {"tool": TOOL, "dst": str(self.dst)})
            self._lock_in(tmp / BOOK)
            os.rename(tmp, self.root)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and tmp.exists():
                self._release()
                shutil.rmtree(tmp)  # ours: made above; the folder in the way is checked by the caller
                return
            raise write_error(e, self.root, "creating the staging folder") from None
        _fsync_dir(self.root.parent)

    def _sweep_private(self) -> None:
        """Delete private folders (``<dst>.partial.new-*``) left by a job killed inside :meth:`_create`: only
        those whose marker names this destination and whose lock is free (their job is gone)."""
        for p in self.root.parent.glob(f"{self.root.name}.new-*"):
            if not self._ours(p / BOOK):
                continue
            try:
                with open(p / BOOK / "lock", "a+") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(p)
            except OSError:
                continue  # still held: a job is creating it right now

    def _reset(self, want: dict[str, Any]) -> None:
        """Empty the staging folder (ours, locked) but its owner marker and lock, then preallocate the files."""
        for p in self.root.iterdir():
            if p.name != BOOK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for p in (self.root / BOOK).iterdir():
            if p.name not in (OWNER, "lock"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        try:
            (self.root / BOOK / "steps").mkdir()
            for name, lay in self.plan.files.items():
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)  # shards in a sub-folder
                with open(self.root / name, "wb") as f:
                    f.write(lay.header)
                    f.truncate(lay.size)  # sparse until written; every byte is written by some step
            _write_json(self.root / BOOK / "plan.json", want)  # last: without it the folder is rebuilt
        except OSError as e:
            raise write_error(e, self.root, "preallocating the output files") from None
        _fsync_dir(self.root)
        kill_point("prepared")

    def _ours(self, book: Path) -> bool:
        owner = _read_json(book / OWNER)
        return bool(owner) and owner.get("tool") == TOOL and owner.get("dst") == str(self.dst)

    def _lock_in(self, book: Path) -> None:
        """flock() the lock file (exclusive, non-blocking).  NFS: Linux maps flock to POSIX byte-range locks
        (lockd) -- works across clients; Lustre: only with the ``flock`` mount option (``localflock`` locks
        per node only; ``noflock`` gives ENOSYS: we then warn and run unlocked, see docs/architecture.md)."""
        if self._lock is not None:
            return
        f = open(book / "lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.seek(0)
                holder = f.read().strip() or "unknown (it has not written its identity yet)"
                f.close()
                raise OutputLockedError(
                    "another conversion is writing to this output", file=str(self.dst),
                    expected=f"no other job on it; held by {holder}",
                    fix="wait for that job to end (or stop it), or choose another output path",
                ) from None
            import warnings

            warnings.warn(f"{book / 'lock'}: this filesystem does not support flock ({e}); the output is not "
                          "protected against a second conversion into it (Lustre: mount with -o flock)", stacklevel=2)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(identity(self.src, self.dst)))
        f.flush()
        self._lock = f

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def done_steps(self) -> set[int]:
        d = self.root / BOOK / "steps"
        if not d.exists():
            return set()
        done = {int(p.name.split(".")[0]) for p in d.glob("*.done")}
        # Interrupt records: a step is done if every rank of one run's world recorded it.
        by_world: dict[int, dict[int, set[int]]] = {}
        for p in d.glob("r*of*.json"):
            try:
                r, w = (int(x) for x in p.stem[1:].split("of"))
                steps = set(json.loads(p.read_text()))
            except (ValueError, json.JSONDecodeError):
                continue  # a record cut short by a second kill counts for nothing
            by_world.setdefault(w, {})[r] = steps
        for w, recs in by_world.items():
            if len(recs) == w:
                done |= set.intersection(*recs.values())
        return done

    def mark_done(self, steps: list[int]) -> None:
        """Record finished steps; called after every rank has fsynced their bytes."""
        d = self.root / BOOK / "steps"
        for step in steps:
            (d / f"{step:06d}.done").write_text("ok")
        _fsync_dir(d)

    def record_interrupt(self, rank: int, world: int, steps: set[int]) -> None:
        """Every rank on Ctrl-C / SIGTERM: fsync its bytes, then record the steps it has finished (no
        collective: the other ranks may be gone).  Written to a temporary name and renamed."""
        self.sync()
        d = self.root / BOOK / "steps"
        tmp = d / f".r{rank}of{world}.tmp"
        tmp.write_text(json.dumps(sorted(steps)))
        _fsync_file(tmp)
        os.replace(tmp, d / f"r{rank}of{world}.json")
        _fsync_dir(d)

    def finalize(self, index_json: dict[str, Any], extra_json: dict[str, dict], source: Path, overwrite: bool) -> None:
        """Write index/config, copy non-weight files, fsync, then commit (see the module docstring)."""
        try:
            self._finalize(index_json, extra_json, source, overwrite)
        except OSError as e:
            raise write_error(e, self.root, "finishing the output (index, config, copies, rename)") from None

    def _finalize(self, index_json, extra_json, source: Path, overwrite: bool) -> None:
        book = self.root / BOOK
        if _read_json(book / "commit.json") is None:
            for name, data in {"model.safetensors.index.json": index_json, **extra_json}.items():
                _write_json(self.root / name, data, indent=2, tmp_dir=book)  # no temporary in the output
            kill_point("finalize-written")
            # The source's config.json / hf_quant_config.json describe FP8 and are never copied as they are;
            # the shards are skipped by name whatever it is (a shard not named *.safetensors is never copied
            # over its converted output).
            skip = set(extra_json) | {"model.safetensors.index.json", "config.json", "hf_quant_config.json"}
            skip |= set(self.plan.files)
            for rel in ckfiles.extra_files(source, skip):
                ckfiles.copy_bounded(source, rel, self.root / rel, tmp_dir=book)
            kill_point("finalize-copied")
            _fsync_tree(self.root)
            _write_json(book / "commit.json", {"complete": True})
            kill_point("committed")
        trash = self.dst.with_name(self.dst.name + ".old")
        if self.dst.exists():
            if not overwrite:
                raise OutputExistsError("the output folder appeared during the conversion", file=str(self.dst),
                                        expected="no folder", fix="choose another path or pass overwrite=True")
            if os.path.lexists(trash):
                raise UnsafeOutputError(
                    "a folder is in the way of replacing the output", file=str(trash),
                    expected="nothing at <output>.old (the old output is moved there, then deleted)",
                    fix="move that folder away, then re-run the same command (it finishes the output)")
            st = os.stat(self.dst)
            _write_json(book / "replacing.json", {"dev": st.st_dev, "ino": st.st_ino})
            os.rename(self.dst, trash)
            kill_point("old-moved")
        os.rename(self.root, self.dst)
        kill_point("renamed")
        _fsync_dir(self.dst.parent)
        kill_point("parent-synced")
        self._finish_commit(self.dst)

    def _finish_commit(self, out: Path) -> None:
        """After the rename: delete the old output (only the folder this run moved aside) and the bookkeeping
        folder, owner marker last (until it is gone a re-run finishes this)."""
        book = out / BOOK
        old = _read_json(book / "replacing.json")
        trash = out.with_name(out.name + ".old")
        if old is not None and trash.is_dir() and not trash.is_symlink():
            st = os.stat(trash)
            if (st.st_dev, st.st_ino) == (old["dev"], old["ino"]):
                shutil.rmtree(trash)
        kill_point("old-removed")
        # plan.json and owner.json last: until they are gone a re-run recognises this output as ours.
        for p in sorted(book.iterdir(), key=lambda p: (p.name in ("plan.json", OWNER), p.name == OWNER, p.name)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            if p.name == "steps":
                kill_point("book-partly-removed")
        os.rmdir(book)
        _fsync_dir(out)
        self._release()

    # -- every rank --------------------------------------------------------------------------------
    def pwrite(self, file: str, offset: int, data: memoryview) -> None:
        try:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(self.root / file, os.O_WRONLY)
            pos = 0
            while pos < len(data):
                pos += os.pwrite(fd, data[pos:], offset + pos)
        except OSError as e:
            raise write_error(e, self.root / file, "writing converted tensors") from None
        self.bytes_written += len(data)

    def sync(self) -> None:
        for file, fd in self._fds.items():
            try:
                os.fsync(fd)
            except OSError as e:
                raise write_error(e, self.root / file, "fsync") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def release(self) -> None:
        self.close()
        self._release()


def _read_json(path: Path) -> Any:
    """Bookkeeping JSON, or None when absent or cut short by a kill (then it is rewritten)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_json(path: Path, data: Any, indent: int | None = None, tmp_dir: Path | None = None) -> None:
    """Write to a temporary name, fsync, rename: a kill leaves the old content or the new, never half."""
    tmp = (tmp_dir or path.parent) / f".{path.name}.tmp"
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n")
    _fsync_file(tmp)
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            _fsync_file(p)
    _fsync_dir(root)
