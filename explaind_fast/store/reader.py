"""Reading a trajectory directory: lazy, memory-mapped, checksummed (format: :mod:`.format`).

    Trajectory.load(directory) -> Trajectory   (read API below; verify() replays, see :mod:`.replay`)
    read_log(directory) -> (complete log entries, byte length of the valid prefix)
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from ..model import ParamLayout
from ..optim import OptimizerRule, StepRecord, make_rule
from .format import FORMAT_NAME, FORMAT_VERSION, LOG, MANIFEST, CorruptTrajectoryError, \
    manifest_checksum
from .replay import VerifyReport, verify


def read_log(directory: str) -> Tuple[List[dict], int]:
    """Complete log entries and the byte length of the valid prefix of the log.

    A last line without its newline, or failing its crc, is a write cut short by a crash (or a
    power loss) and is ignored. Any earlier line that fails its crc, does not parse or has the
    wrong step number is corruption: CorruptTrajectoryError.
    """
    path = os.path.join(directory, LOG)
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        raw = f.read()
    entries, pos = [], 0
    while True:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            break  # no newline: an incomplete final write (or nothing left)
        line = raw[pos:nl].decode("utf-8", errors="replace")
        text, sep, crc = line.rpartition("\t")
        ok = bool(sep) and crc == f"{zlib.crc32(text.encode()):08x}"
        entry = None
        if ok:
            try:
                entry = json.loads(text)
            except ValueError:
                ok = False
        if not ok and nl == len(raw) - 1:
            break  # a damaged *last* line is what a power loss mid-append can leave: incomplete
        if not ok or entry.get("step") != len(entries):
            raise CorruptTrajectoryError(
                f"{path}: log line {len(entries) + 1} (stored step {len(entries)}) is corrupted "
                "(checksum mismatch or wrong step number); the trajectory is damaged beyond the "
                "last step a crash can leave incomplete")
        entries.append(entry)
        pos = nl + 1
    return entries, pos


class Trajectory:
    """A recorded training run, read lazily (memory-mapped safetensors, checksums on first access).

    Read API (the contract with the attribution engine)::

        traj.layout, traj.optimizer_kind ("adamw" | "adam" | "sgd"), traj.rule, traj.hyper
        traj.num_steps (N stored updates, states θ_0..θ_N), traj.checkpoint_every (k)
        traj.dataset_size (int or None), traj.dtype (storage dtype of θ and moments)
        traj.theta(s, dtype=None, device=None) -> [D] θ_s, s in 0..N
        traj.step(s) -> StepRecord of stored update s (θ_s → θ_{s+1}), s in 0..N-1
        traj.raw_steps(s) -> StepRecords of the raw optimizer steps inside stored update s

    With k = 1 a StepRecord carries the batch (indices, weights), clip factor, lr, weight decay,
    step count and v_{s+1}; exp_avg is None unless the first moment was stored. With k > 1 the
    update spans several raw steps: ``step(s)`` carries lr / weight decay / step count of its last
    raw step, v and the first moment after it, and no batch (see ``raw_steps(s)``).
    Memory: reading a step materialises only the tensors asked for (each [D] or [B]).
    """

    def __init__(self, directory: str, manifest: dict, entries: List[dict], log_bytes: int,
                 check_on_access: bool = True):
        self.directory = directory
        self.check_on_access = check_on_access
        self.manifest = manifest
        self._entries = entries
        self._log_bytes = log_bytes
        self.layout = ParamLayout.from_dict(manifest["layout"])
        self.optimizer_kind: str = manifest["optimizer"]["kind"]
        self.hyper: List[Dict] = manifest["optimizer"]["hyper"]
        self.rule: OptimizerRule = make_rule(self.optimizer_kind, self.layout, self.hyper)
        self.checkpoint_every: int = int(manifest["checkpoint_every"])
        self.dataset_size: Optional[int] = manifest.get("dataset_size")
        self.dtype: torch.dtype = getattr(torch, manifest["dtype"])
        self._checked: set = set()

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, directory: str, check_on_access: bool = True) -> "Trajectory":
        """Open a trajectory directory; every complete step is available (see module docstring).

        ``check_on_access``: verify each file's sha256 the first time it is read (reads the whole
        file once). Pass False to read only the tensors asked for from very large files;
        :meth:`check` and :meth:`verify` still check everything."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no trajectory directory '{directory}'")
        if not os.path.exists(path):
            raise FileNotFoundError(f"'{directory}' holds no trajectory: {MANIFEST} is missing "
                                    "(recording never started, or this is another directory)")
        try:
            with open(path, "rb") as f:
                manifest = json.loads(f.read().decode())
        except ValueError as e:
            raise CorruptTrajectoryError(f"{path}: manifest is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not an explaind_fast trajectory manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: trajectory format version {manifest.get('format_version')} "
                             f"is not supported by this version (reads {FORMAT_VERSION})")
        if manifest.get("sha256") != manifest_checksum(manifest):
            raise CorruptTrajectoryError(f"{path}: the manifest does not match its checksum "
                                         "(edited or corrupted)")
        entries, log_bytes = read_log(directory)
        return cls(directory, manifest, entries, log_bytes, check_on_access)

    # ------------------------------------------------------------------ sizes
    @property
    def num_steps(self) -> int:
        return len(self._entries)

    @property
    def num_raw_steps(self) -> int:
        return sum(len(e["raw"]) for e in self._entries)

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (f"Trajectory('{self.directory}', kind={self.optimizer_kind}, D={self.layout.D}, "
                f"num_steps={self.num_steps}, checkpoint_every={self.checkpoint_every})")

    # ------------------------------------------------------------------ files and checksums
    def _file_info(self, s: Optional[int]) -> Tuple[str, str, str]:
        """(path, sha256, description) of θ_0's file (s=None) or stored update s's file."""
        if s is None:
            info = self.manifest["init"]
            return os.path.join(self.directory, info["file"]), info["sha256"], "θ_0"
        e = self._entries[s]
        return os.path.join(self.directory, e["file"]), e["sha256"], f"stored step {s}"

    def _check_file(self, s: Optional[int], force: bool = False) -> str:
        path, sha, what = self._file_info(s)
        if path in self._checked or not (force or self.check_on_access):
            if not os.path.exists(path):
                raise CorruptTrajectoryError(f"{path} ({what}) is missing")
            return path
        if not os.path.exists(path):
            raise CorruptTrajectoryError(f"{path} ({what}) is missing")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != sha:
            raise CorruptTrajectoryError(
                f"{path} ({what}) is corrupted or truncated: sha256 {h.hexdigest()[:16]}… does "
                f"not match the recorded {sha[:16]}…")
        self._checked.add(path)
        return path

    def check(self) -> None:
        """Verify the checksum of every file now; raises CorruptTrajectoryError naming the first
        bad file and its step."""
        self._check_file(None, force=True)
        for s in range(self.num_steps):
            self._check_file(s, force=True)

    def _read(self, s: Optional[int], keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        path = self._check_file(s)
        with safe_open(path, framework="pt") as f:
            have = set(f.keys())
            return {k: f.get_tensor(k) for k in keys if k in have}

    def _check_index(self, s: int, upper: int, what: str) -> int:
        if not isinstance(s, int) or isinstance(s, bool):
            s = int(s)
        if s < 0:
            s += upper
        if not 0 <= s < upper:
            raise IndexError(f"{what} index {s} out of range: the trajectory has "
                             f"{self.num_steps} stored updates (states 0..{self.num_steps})")
        return s

    # ------------------------------------------------------------------ read API
    def theta(self, s: int, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """θ_s as a flat [D] tensor (storage dtype unless ``dtype``), s in 0..num_steps."""
        s = self._check_index(s, self.num_steps + 1, "state")
        t = self._read(None if s == 0 else s - 1, ["theta"])["theta"]
        return t.to(dtype=dtype or t.dtype, device=device)

    def raw_steps(self, s: int) -> List[StepRecord]:
        """The raw optimizer steps inside stored update s: scalars and batches, no tensors of size
        D. ``index`` is the raw step's global index. One element when checkpoint_every == 1."""
        s = self._check_index(s, self.num_steps, "step")
        raw = self._entries[s]["raw"]
        keys = [f"batch_{kind}.{j}" for j in range(len(raw)) for kind in ("indices", "weights")]
        t = self._read(s, keys)
        return [StepRecord(index=r["index"], step_count=r["step_count"], lr=list(r["lr"]),
                           weight_decay=list(r["weight_decay"]),
                           clip_factor=float(r["clip_factor"]), **self._batch(t, r, j))
                for j, r in enumerate(raw)]

    @staticmethod
    def _batch(t: Dict[str, torch.Tensor], r: dict, j: int) -> Dict[str, torch.Tensor]:
        idx = t[f"batch_indices.{j}"].to(torch.int64)
        if r.get("uniform_weight") is not None:
            w = torch.full((idx.numel(),), float(r["uniform_weight"]), dtype=torch.float64)
        else:
            w = t[f"batch_weights.{j}"]
        return {"batch_indices": idx, "batch_weights": w}

    def step(self, s: int) -> StepRecord:
        """StepRecord of stored update s (θ_s → θ_{s+1}); see the class docstring."""
        s = self._check_index(s, self.num_steps, "step")
        raw = self._entries[s]["raw"]
        last = raw[-1]
        keys = ["exp_avg_sq", "exp_avg"]
        single = len(raw) == 1 and self.checkpoint_every == 1
        if single:
            keys += ["batch_indices.0", "batch_weights.0"]
        t = self._read(s, keys)
        batch = self._batch(t, last, 0) if single else {}
        return StepRecord(index=s, step_count=last["step_count"], lr=list(last["lr"]),
                          weight_decay=list(last["weight_decay"]),
                          clip_factor=float(last["clip_factor"]) if single else 1.0,
                          exp_avg_sq=t.get("exp_avg_sq"), exp_avg=t.get("exp_avg"), **batch)

    # ------------------------------------------------------------------ replay
    def verify(self, model: Optional[torch.nn.Module] = None) -> VerifyReport:
        """Replay every stored update from the stored state: see :func:`explaind_fast.store.verify`."""
        return verify(self, model)
