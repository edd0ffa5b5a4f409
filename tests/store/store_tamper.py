"""Helpers of the store safety and fuzz tests: edit a recorded trajectory while keeping every
checksum consistent (so that only the store's validation can catch the edit), snapshot what a
trajectory loads to, and guard against hangs."""
import contextlib
import hashlib
import json
import os
import signal
import struct

import torch
from safetensors.torch import load as st_load

from explaind_fast.store import LOG, MANIFEST, Trajectory, encode_log_line, manifest_checksum, \
    step_file_name, tensor_file_bytes


# ------------------------------------------------------------------------------ log and manifest
def read_entries(d):
    return [json.loads(line.rpartition("\t")[0])
            for line in open(os.path.join(d, LOG), encoding="utf-8").read().splitlines()]


def write_entries(d, entries, raw_lines=None):
    """Rewrite the log with valid crcs; ``raw_lines`` {line index: text} replaces a line's JSON
    text verbatim (still crc-protected)."""
    out = []
    for i, e in enumerate(entries):
        if raw_lines and i in raw_lines:
            import zlib
            text = raw_lines[i]
            out.append(f"{text}\t{zlib.crc32(text.encode()):08x}\n")
        else:
            out.append(encode_log_line(e))
    with open(os.path.join(d, LOG), "w", encoding="utf-8") as f:
        f.write("".join(out))


def read_manifest(d):
    return json.load(open(os.path.join(d, MANIFEST)))


def write_manifest(d, m, fix_checksum=True):
    if fix_checksum and isinstance(m, dict):
        m["sha256"] = manifest_checksum(m)
    with open(os.path.join(d, MANIFEST), "w") as f:
        f.write(json.dumps(m, indent=1) + "\n")


# ------------------------------------------------------------------------------ tensor files
def read_tensors(path):
    return st_load(open(path, "rb").read())


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file with a hand-made header (no checks: for malformed headers)."""
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def put_file(d, s, data: bytes):
    """Store ``data`` as the tensor file of stored step s (None: θ_0) and record its sha256 and
    size where the store keeps them (the log line, or the manifest)."""
    name = "theta_0.safetensors" if s is None else step_file_name(s)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    sha = hashlib.sha256(data).hexdigest()
    if s is None:
        m = read_manifest(d)
        m["init"].update(sha256=sha, bytes=len(data))
        write_manifest(d, m)
    else:
        entries = read_entries(d)
        entries[s].update(sha256=sha, bytes=len(data))
        write_entries(d, entries)


def rewrite_tensors(d, s, edit, step_tag="same"):
    """Apply ``edit(tensors)`` (in place or returning a new dict) to the tensors of stored step s
    (None: θ_0) and store them consistently."""
    name = "theta_0.safetensors" if s is None else step_file_name(s)
    tensors = read_tensors(os.path.join(d, name))
    edited = edit(tensors)
    tensors = edited if isinstance(edited, dict) else tensors
    put_file(d, s, tensor_file_bytes(tensors, s if step_tag == "same" else step_tag))


# ------------------------------------------------------------------------------ snapshots
def snapshot(traj: Trajectory, steps=None):
    """Everything the read API returns, as plain comparable values."""
    n = traj.num_steps if steps is None else steps
    out = {"thetas": [traj.theta(s) for s in range(n + 1)], "steps": [], "raw": []}
    for s in range(n):
        r = traj.step(s)
        out["steps"].append(_record(r))
        out["raw"].append([_record(x) for x in traj.raw_steps(s)])
    return out


def _record(r):
    return {k: getattr(r, k) for k in ("index", "step_count", "lr", "weight_decay", "clip_factor",
                                       "batch_indices", "batch_weights", "exp_avg_sq", "exp_avg")}


def same_value(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same_value(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------ hangs
class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds=10.0):
    """Fail (instead of blocking CI) if the body takes longer than ``seconds``: SIGALRM interrupts
    a blocking open/read of a FIFO, too."""
    def handler(signum, frame):
        raise Hang(f"took longer than {seconds} s (a hang?)")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
