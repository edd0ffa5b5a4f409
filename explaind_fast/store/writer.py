"""Crash-safe writing of a trajectory directory (format: :mod:`.format`, docs/design.md §6).

Every tensor file is written to ``<name>.tmp``, fsynced and renamed over its final name; only then
is its log line appended (and fsynced), so a process killed at any point leaves every complete step
loadable. :class:`BackgroundWriter` moves that work to one thread (write-behind).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import threading
from typing import Dict, Optional

import torch

from .format import INIT_FILE, LOG, MANIFEST, encode_log_line, manifest_checksum, step_file_name, \
    tensor_file_bytes


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, fsync: bool = True) -> str:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + rename; return its sha256 (hex)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return hashlib.sha256(data).hexdigest()


class TrajectoryWriter:
    """Appends stored updates to a trajectory directory (used by TrajectoryRecorder)."""

    def __init__(self, directory: str, fsync: bool = True):
        self.directory = directory
        self.fsync = fsync

    def create(self, manifest: dict, theta0: torch.Tensor) -> None:
        os.makedirs(self.directory, exist_ok=True)
        data = tensor_file_bytes({"theta": theta0}, None)
        sha = atomic_write(os.path.join(self.directory, INIT_FILE), data, self.fsync)
        manifest = json.loads(json.dumps(  # plain JSON types, so the checksum survives a reload
            dict(manifest, init={"file": INIT_FILE, "sha256": sha, "bytes": len(data)})))
        manifest["sha256"] = manifest_checksum(manifest)
        # The manifest goes last: a directory without it holds no trajectory yet.
        atomic_write(os.path.join(self.directory, MANIFEST),
                     (json.dumps(manifest, indent=1) + "\n").encode(), self.fsync)

    def prepare_resume(self, num_steps: int, valid_log_bytes: int) -> None:
        """Drop what a crash left behind: a partial last log line, temp files, unlogged steps."""
        log = os.path.join(self.directory, LOG)
        if os.path.exists(log) and os.path.getsize(log) != valid_log_bytes:
            with open(log, "r+b") as f:
                f.truncate(valid_log_bytes)
                os.fsync(f.fileno())
        for name in os.listdir(self.directory):
            orphan_step = (name.startswith("step_") and name.endswith(".safetensors")
                           and name[5:-12].isdigit() and int(name[5:-12]) >= num_steps)
            if name.endswith(".tmp") or orphan_step:
                os.remove(os.path.join(self.directory, name))

    def append(self, s: int, tensors: Dict[str, torch.Tensor], payload: dict) -> None:
        name = step_file_name(s)
        data = tensor_file_bytes(tensors, s)
        sha = atomic_write(os.path.join(self.directory, name), data, self.fsync)
        line = encode_log_line(dict(payload, step=s, file=name, sha256=sha, bytes=len(data)))
        with open(os.path.join(self.directory, LOG), "ab") as f:
            f.write(line.encode())
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())


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
