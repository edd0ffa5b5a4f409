"""The on-disk trajectory format (docs/design.md §6): names, encodings, checksums.

A trajectory is a directory::

    manifest.json            static header, written once (atomically) when recording starts:
                             format name/version, parameter layout (names, shapes, dtypes, param
                             group of each tensor, in flat order), optimizer kind, class and constant
                             hyperparameters per group (betas, eps / momentum), checkpoint_every,
                             dataset_size, storage dtype, the model's buffers
                             (``model_buffers``: names, shapes, dtypes; optional), the sha256 of
                             theta_0.safetensors, and its own checksum (``sha256`` of its other
                             fields, canonical JSON).
    theta_0.safetensors      θ_0, flat [D]; the initial buffers as ``model_buffer.<name>``.
    steps.jsonl              append-only log, one line per *stored* update s = 0..N-1:
                             ``<json>\\t<crc32 of json>``; the json names the tensor file of the
                             step with its sha256 and size and holds the scalars of every raw
                             optimizer step inside the update (index, step_count, lr and
                             weight_decay per group, clip_factor, batch size; optional:
                             ``inactive``, the layout indices of the tensors without a gradient,
                             and ``tensor_step_counts``, torch's per-tensor counters where they
                             differ from step_count) and, optional, ``buffers_changed``: the
                             buffers stored in the step's file.
    step_00000000.safetensors  tensors of stored update s: ``theta`` = θ_{s+1} (flat [D]),
                             ``exp_avg_sq`` = v_{s+1} (Adam-type), ``exp_avg`` = the optimizer's
                             first moment after the update (torch's exp_avg; for SGD the momentum
                             buffer, which includes the coupled weight decay) when stored, and
                             ``batch_indices.{j}`` (int32 when every index fits, else int64) and
                             ``batch_weights.{j}`` (float64; omitted when all weights are equal,
                             the log then holds the value as ``uniform_weight``, exactly) of the
                             j-th raw step of the update, and ``model_buffer.<name>`` for every
                             buffer in ``buffers_changed`` (its value after the update, its own
                             dtype). Read back as int64 / float64.

Why safetensors (and not .npy): one file per stored update holds all its tensors, so publishing a
step is a single atomic rename; ``safe_open`` memory-maps the file and materialises only the tensor
asked for (θ_s without v, say); the header is plain JSON and the format cannot execute code (no
pickle anywhere). A .npy file holds one array, so a step would need several files and renames, and
.npz is a zip archive that cannot be memory-mapped.

Crash safety: every tensor file is written to ``<name>.tmp``, fsynced and renamed over its final
name; only then is its log line appended (and fsynced). A step is *complete* when its log line is
whole and its crc matches; a process killed at any point leaves a trajectory whose complete steps
all load (a half-written last line, an orphaned ``.tmp`` or a step file without a log line are
ignored, and cleaned away when a recorder resumes). A damaged line *before* the last one, or a
tensor file whose sha256 differs from its log line, is corruption and raises
:class:`CorruptTrajectoryError` naming the file and the step. Checksums are verified lazily on the
first access of each file, or all at once by :meth:`Trajectory.check`.

Safety (threat model). The *path* of the directory is the caller's; everything *inside* it is
untrusted: a trajectory may come from elsewhere, and anyone who can write the directory may plant
entries in it, also while a recorder runs. Whatever is in it, the library never reads, writes or
blocks outside it, never returns a number the files do not checksum to (with the default
``check_on_access=True``), and refuses with :class:`CorruptTrajectoryError` (naming the file, the
log line and the field) instead of an AttributeError / KeyError / wrong number:

* one writer at a time: a recorder holds an exclusive ``flock`` on ``writer.lock`` (opened without
  following links) for its lifetime; a second one refuses at open (:class:`TrajectoryLockedError`
  in :mod:`.writer`); the kernel drops the lock of a killed process, so no stale-lock guessing;
* writes never follow links: every file is opened relative to a descriptor of the directory with
  ``O_NOFOLLOW``; ``.tmp`` files are unlinked (never followed) and created with ``O_EXCL``, renamed
  in the directory; the log is appended to / truncated only if it is a regular file with one link;
* reads: only the canonical names below (a name from the manifest or the log is compared with the
  name it must have, never used as a path); each is ``lstat``-ed and must be a regular file (no
  symlink, FIFO, device, directory), opened with ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat``-ed again;
  sizes are bounded (the manifest, each log line and each safetensors header by the limits below;
  each tensor file must have exactly the byte count its log line / the manifest records);
* every field of the manifest and of every log line is validated by type and range once at load
  (unknown extra keys are tolerated, for optional fields added later); every tensor's dtype and
  shape is checked against the manifest (θ and the moments [D] in the storage dtype; batch
  indices integer, weights float64, one per index); in files whose checksum was verified, batch
  indices must lie in [0, dataset_size) and weights be finite.

Not covered: rewriting a tensor file *in place* (which needs write permission on the file itself;
the writer never does it). A file is hashed once per identity (inode, size, mtime, ctime; a
replaced or rewritten file is hashed again on its next access) and its tensors are mapped
copy-on-write from that open file, so bytes rewritten in place after the check can show through,
and a file truncated while mapped raises SIGBUS, as with any memory map. Nor the path to the
directory (the caller's). With ``check_on_access=False`` the bytes of a file are trusted until
:meth:`Trajectory.check` (its structure is still checked). The checksums are integrity checks
against damage, not signatures: whoever can write the directory can write a consistent, different
trajectory (``verify`` replays it). POSIX only (``dir_fd``, ``O_NOFOLLOW``, ``flock``).

The writer is :mod:`.writer`, the reader :mod:`.reader`, the replay check :mod:`.replay`, the
field and header validation :mod:`.schema`.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from typing import Dict, Optional

import torch
from safetensors.torch import save as _safetensors_bytes

FORMAT_NAME = "explaind_fast.trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOG = "steps.jsonl"
INIT_FILE = "theta_0.safetensors"
LOCK_FILE = "writer.lock"   # held (flock) by the one recorder writing the directory
TMP_SUFFIX = ".tmp"

# Bounds on what the reader parses (a legitimate trajectory stays far below each).
MAX_MANIFEST_BYTES = 64 << 20      # manifest.json
MAX_LOG_LINE_BYTES = 64 << 20      # one line of steps.jsonl
MAX_HEADER_BYTES = 16 << 20        # the JSON header of one safetensors file
MAX_PARAMETERS = 1 << 40           # D


class CorruptTrajectoryError(ValueError):
    """A trajectory directory that cannot be read safely: a file or log line that does not match
    its checksum, is missing, malformed, of the wrong type, size, dtype or shape, or not a regular
    file. The message names the file, and for the log the line and the field."""


def step_file_name(s: int) -> str:
    return f"step_{s:08d}.safetensors"


_STEP_NAME = re.compile(r"step_([0-9]{8,})\.safetensors")


def parse_step_file_name(name: str) -> Optional[int]:
    """s if ``name`` is exactly ``step_file_name(s)``, else None."""
    m = _STEP_NAME.fullmatch(name)
    if m is None:
        return None
    s = int(m.group(1))
    return s if step_file_name(s) == name else None


def own_tmp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file the writer creates (``<canonical name>.tmp``)."""
    if not name.endswith(TMP_SUFFIX):
        return False
    base = name[:-len(TMP_SUFFIX)]
    return base in (INIT_FILE, MANIFEST) or parse_step_file_name(base) is not None


def tensor_file_bytes(tensors: Dict[str, torch.Tensor], step: Optional[int]) -> bytes:
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "step": "init" if step is None else str(step)}
    return _safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                              metadata=meta)


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's fields other than ``sha256`` (sorted-key JSON)."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def encode_log_line(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{text}\t{zlib.crc32(text.encode()):08x}\n"
