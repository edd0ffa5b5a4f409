"""The on-disk trajectory store (docs/design.md §6): format, writer, reader, replay.

Owns: the directory layout and file formats (:mod:`.format`, with the threat model), crash-safe,
exclusive (one locked writer), link-safe appends (:mod:`.writer`, :mod:`._fs`), lazy checksummed
and validated reading through the read API of :class:`Trajectory` (:mod:`.reader`,
:mod:`.schema`), and the replay check :func:`verify` (:mod:`.replay`). The attribution engine reads
a run only through :class:`Trajectory`'s read API.

May import: :mod:`explaind_fast.model`, :mod:`explaind_fast.optim`. Never imports: recording,
quadrature, attribution, ops.
"""
from .format import (FORMAT_NAME, FORMAT_VERSION, INIT_FILE, LOCK_FILE, LOG, MANIFEST,
                     CorruptTrajectoryError, encode_log_line, manifest_checksum, step_file_name,
                     tensor_file_bytes)
from .reader import Trajectory, read_log
from .replay import VerifyReport, verify
from .writer import BackgroundWriter, TrajectoryLockedError, TrajectoryWriter, atomic_write

__all__ = ["Trajectory", "read_log", "VerifyReport", "verify", "TrajectoryWriter",
           "BackgroundWriter", "atomic_write", "CorruptTrajectoryError", "TrajectoryLockedError",
           "FORMAT_NAME", "FORMAT_VERSION", "INIT_FILE", "LOCK_FILE", "LOG", "MANIFEST",
           "encode_log_line", "manifest_checksum", "step_file_name", "tensor_file_bytes"]
