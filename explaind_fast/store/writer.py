"""Crash-safe, exclusive, link-safe writing of a trajectory directory (format and threat model:
:mod:`.format`, docs/design.md §6).

Every tensor file is written to ``<name>.tmp``, fsynced and renamed over its final name; only then
is its log line appended (and fsynced), so a process killed at any point leaves every complete step
loadable. :class:`BackgroundWriter` moves that work to one thread (write-behind).

One writer at a time: :meth:`TrajectoryWriter.open` takes an exclusive ``flock`` on
``writer.lock`` in the directory and holds it until :meth:`TrajectoryWriter.close`; a second
writer (another process, or another recorder in this one) gets :class:`TrajectoryLockedError`.
The kernel releases the lock of a killed process, so a lock file left behind is simply taken again
(no stale-lock guessing). All writes are relative to a descriptor of the directory and never follow
a link (:mod:`._fs`): a ``.tmp`` entry is unlinked and created afresh with ``O_EXCL``, renames stay
inside the directory, and the log is appended to or truncated only if it is a regular file with a
single link.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import threading
from typing import Dict, List, Optional

import torch

from . import _fs
from .format import INIT_FILE, LOCK_FILE, LOG, MANIFEST, encode_log_line, manifest_checksum, \
    own_tmp_name, parse_step_file_name, step_file_name, tensor_file_bytes


class TrajectoryLockedError(RuntimeError):
    """Another writer holds the trajectory directory (two writers would corrupt it)."""


def _unsafe(directory, name: str, e: _fs.UnsafeEntry) -> RuntimeError:
    return RuntimeError(f"refusing to write '{os.path.join(str(directory), name)}': it is "
                        f"{e.reason}; the store never writes through links or to files outside "
                        "the trajectory directory")


def atomic_write(path: str, data: bytes, fsync: bool = True) -> str:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + rename, never following a link at
    either name (:func:`._fs.atomic_write_at`); return its sha256 (hex)."""
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = _fs.open_dir(directory)
    try:
        _fs.atomic_write_at(dir_fd, name, data, fsync)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


class TrajectoryWriter:
    """Appends stored updates to a trajectory directory (used by TrajectoryRecorder).

    ``open()`` (called by every writing method if needed) creates the directory, opens it and
    takes the writer lock; ``close()`` releases both. Use as a context manager or close it."""

    def __init__(self, directory: str, fsync: bool = True):
        self.directory = directory
        self.fsync = fsync
        self._dir_fd: Optional[int] = None
        self._lock_fd: Optional[int] = None
        self.created_directory = False

    # ------------------------------------------------------------------ the directory and lock
    def open(self) -> None:
        """Create the directory if needed, open it and take the exclusive writer lock.

        TrajectoryLockedError if another writer holds it."""
        if self._dir_fd is not None:
            return
        created = not os.path.lexists(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        dir_fd = _fs.open_dir(self.directory)
        try:
            self._lock_fd = _fs.acquire_lock(dir_fd, LOCK_FILE)
        except _fs.LockHeld as e:
            os.close(dir_fd)
            self._remove_created(created)
            who = f"process {e.holder}" if e.holder else "another process"
            raise TrajectoryLockedError(
                f"'{self.directory}' is being written by another recorder ({who} holds "
                f"{LOCK_FILE}); two writers would corrupt the trajectory. Close that recorder "
                "(or let it finish) first, or record into another directory") from None
        except _fs.UnsafeEntry as e:
            os.close(dir_fd)
            raise _unsafe(self.directory, LOCK_FILE, e) from None
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd = dir_fd
        self.created_directory = created

    def _remove_created(self, created: bool) -> None:
        if created:
            try:
                os.rmdir(self.directory)   # only if still empty
            except OSError:
                pass

    @property
    def is_open(self) -> bool:
        return self._dir_fd is not None

    def close(self, remove_if_unused: bool = False) -> None:
        """Release the lock (its file is removed) and the directory. ``remove_if_unused``: also
        remove the directory if open() created it and it is still empty."""
        dir_fd, lock_fd = self._dir_fd, self._lock_fd
        self._dir_fd = self._lock_fd = None
        if dir_fd is None:
            return
        try:
            if lock_fd is not None:
                _fs.release_lock(dir_fd, LOCK_FILE, lock_fd)
        finally:
            os.close(dir_fd)
        if remove_if_unused:
            self._remove_created(self.created_directory)

    def __enter__(self) -> "TrajectoryWriter":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fd(self) -> int:
        self.open()
        return self._dir_fd

    def exists(self, name: str) -> bool:
        """Whether the directory has an entry ``name`` (of any type; links not followed)."""
        return _fs.lstat(self._fd(), name) is not None

    def listdir(self) -> List[str]:
        return os.listdir(self._fd())

    # ------------------------------------------------------------------ writing
    def _atomic_write(self, name: str, data: bytes) -> str:
        try:
            _fs.atomic_write_at(self._fd(), name, data, self.fsync)
        except _fs.UnsafeEntry as e:
            raise _unsafe(self.directory, name + ".tmp", e) from None
        return hashlib.sha256(data).hexdigest()

    def create(self, manifest: dict, theta0: torch.Tensor,
               extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write θ_0's file (θ_0 and ``extra`` tensors: the model's buffers) and the manifest."""
        data = tensor_file_bytes({"theta": theta0, **(extra or {})}, None)
        sha = self._atomic_write(INIT_FILE, data)
        manifest = json.loads(json.dumps(  # plain JSON types, so the checksum survives a reload
            dict(manifest, init={"file": INIT_FILE, "sha256": sha, "bytes": len(data)})))
        manifest["sha256"] = manifest_checksum(manifest)
        # The manifest goes last: a directory without it holds no trajectory yet.
        self._atomic_write(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())

    def prepare_resume(self, num_steps: int, valid_log_bytes: int) -> None:
        """Drop what a crash left behind: a partial last log line, the writer's own temp files,
        unlogged steps. Nothing else is touched; nothing is followed."""
        dir_fd = self._fd()
        st = _fs.lstat(dir_fd, LOG)
        if st is not None and st.st_size != valid_log_bytes:
            try:
                fd = _fs.open_for_writing(dir_fd, LOG, os.O_RDWR)
            except _fs.UnsafeEntry as e:
                raise _unsafe(self.directory, LOG, e) from None
            try:
                os.ftruncate(fd, valid_log_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in os.listdir(dir_fd):
            s = parse_step_file_name(name)
            if own_tmp_name(name) or (s is not None and s >= num_steps):
                try:
                    _fs.unlink_entry(dir_fd, name)
                except _fs.UnsafeEntry as e:
                    raise _unsafe(self.directory, name, e) from None

    def append(self, s: int, tensors: Dict[str, torch.Tensor], payload: dict) -> None:
        name = step_file_name(s)
        data = tensor_file_bytes(tensors, s)
        sha = self._atomic_write(name, data)
        line = encode_log_line(dict(payload, step=s, file=name, sha256=sha, bytes=len(data)))
        try:
            fd = _fs.open_for_writing(self._fd(), LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except _fs.UnsafeEntry as e:
            raise _unsafe(self.directory, LOG, e) from None
        try:
            _fs.write_all(fd, line.encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


class BackgroundWriter:
    """Runs a TrajectoryWriter's appends on one worker thread (write-behind), in order.

    Serialising, hashing, writing and fsyncing a step then overlap the next training step. Every
    step is still written atomically, in order; a process killed with steps still queued loses
    those (at most ``max_pending`` + 1), never a written one. A failed write is re-raised by the
    next ``submit``/``flush``/``close``; later steps are then dropped, not written after a gap.
    ``close`` runs at interpreter exit if the owner forgot.
    """

    def __init__(self, writer: TrajectoryWriter, max_pending: int = 2):
        self.writer = writer
        self.error: Optional[BaseException] = None
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="explaind-trajectory-writer",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _run(self):
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    self.writer.append(*item)
            except BaseException as e:  # handed to the training thread
                self.error = e
            finally:
                self._queue.task_done()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the trajectory failed in the background: "
                               f"{type(self.error).__name__}: {self.error}") from self.error

    def append(self, s: int, tensors: Dict[str, torch.Tensor], payload: dict) -> None:
        self.raise_if_failed()
        self._queue.put((s, tensors, payload))

    def flush(self) -> None:
        self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        atexit.unregister(self.close)
        self.raise_if_failed()
