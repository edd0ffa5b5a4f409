"""The on-disk trajectory format (docs/design.md §6): names, encodings, checksums.

A trajectory is a directory::

    manifest.json            static header, written once (atomically) when recording starts:
                             format name/version, parameter layout (names, shapes, dtypes, param
                             group of each tensor, in flat order), optimizer kind, class and constant
                             hyperparameters per group (betas, eps / momentum), checkpoint_every,
                             dataset_size, storage dtype, the sha256 of theta_0.safetensors, and
                             its own checksum (``sha256`` of its other fields, canonical JSON).
    theta_0.safetensors      θ_0, flat [D].
    steps.jsonl              append-only log, one line per *stored* update s = 0..N-1:
                             ``<json>\\t<crc32 of json>``; the json names the tensor file of the
                             step with its sha256 and size and holds the scalars of every raw
                             optimizer step inside the update (index, step_count, lr and
                             weight_decay per group, clip_factor, batch size).
    step_00000000.safetensors  tensors of stored update s: ``theta`` = θ_{s+1} (flat [D]),
                             ``exp_avg_sq`` = v_{s+1} (Adam-type), ``exp_avg`` = the optimizer's
                             first moment after the update (torch's exp_avg; for SGD the momentum
                             buffer, which includes the coupled weight decay) when stored, and
                             ``batch_indices.{j}`` (int32 when every index fits, else int64) and
                             ``batch_weights.{j}`` (float64; omitted when all weights are equal,
                             the log then holds the value as ``uniform_weight``, exactly) of the
                             j-th raw step of the update. Read back as int64 / float64.

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

One writer at a time, and writes never follow links: see :mod:`.writer`.

The writer is :mod:`.writer`, the reader :mod:`.reader`, the replay check :mod:`.replay`.
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


class CorruptTrajectoryError(ValueError):
    """A trajectory file or log line does not match its checksum, or is missing."""


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
