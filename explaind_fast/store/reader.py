"""Reading a trajectory directory: lazy, checksummed, validated (format and threat model:
:mod:`.format`; field checks: :mod:`.schema`).

    Trajectory.load(directory) -> Trajectory   (read API below; verify() replays, see :mod:`.replay`)
    read_log(directory) -> (complete log entries, byte length of the valid prefix)

Everything is read through a descriptor of the directory, by canonical name only, from regular
files only (no symlink, FIFO or device is ever opened; :mod:`._fs`). The manifest and the log are
parsed and validated once, at load; a tensor file costs a few syscalls per access (lstat, open,
fstat, the reads) plus, on its first access (or when it changed), its header check and sha256.
"""
from __future__ import annotations

import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..model import ParamLayout
from ..model.layout import own_storage
from ..optim import OptimizerRule, StepRecord, make_rule
from . import _fs
from .format import FORMAT_NAME, FORMAT_VERSION, INIT_FILE, LOG, MANIFEST, MAX_HEADER_BYTES, \
    MAX_LOG_LINE_BYTES, MAX_MANIFEST_BYTES, CorruptTrajectoryError
from .replay import VerifyReport, verify
from .schema import BUFFER_PREFIX, ST_CODE, ST_DTYPES, TensorInfo, Where, parse_header, \
    parse_json, validate_entry, validate_entry_context, validate_manifest

_RESERVED = ("theta", "exp_avg_sq", "exp_avg")   # names with a meaning; "batch_*", "model_buffer.*" too


def _refused(path: str, what: str, e: _fs.UnsafeEntry) -> CorruptTrajectoryError:
    return CorruptTrajectoryError(f"{path} ({what}) is {e.reason}: the store reads only regular "
                                  "files inside the trajectory directory, never through a link")


def _open_dir(directory) -> int:
    try:
        return _fs.open_dir(directory)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no trajectory directory '{directory}'") from None


def read_log(directory: str) -> Tuple[List[dict], int]:
    """Complete log entries and the byte length of the valid prefix of the log.

    A last line without its newline, or failing its crc, is a write cut short by a crash (or a
    power loss) and is ignored. Any earlier line that fails its crc, does not parse or has the
    wrong step number is corruption: CorruptTrajectoryError. So is a line whose crc matches but
    whose fields are malformed (naming the line and the field), a line longer than
    MAX_LOG_LINE_BYTES, and a log that is not a regular file.
    """
    dir_fd = _open_dir(directory)
    try:
        return _read_log_at(dir_fd, directory)
    finally:
        os.close(dir_fd)


def _read_log_at(dir_fd: int, directory) -> Tuple[List[dict], int]:
    path = os.path.join(directory, LOG)
    try:
        fd, st = _fs.open_regular(dir_fd, LOG)
    except FileNotFoundError:
        return [], 0
    except _fs.UnsafeEntry as e:
        raise _refused(path, "the log", e) from None
    size = st.st_size   # read no further, even if a writer appends meanwhile
    entries: List[dict] = []
    pos, next_raw = 0, 0
    with os.fdopen(fd, "rb") as f:
        while pos < size:
            line = f.readline(min(MAX_LOG_LINE_BYTES + 1, size - pos))
            if not line.endswith(b"\n"):
                if len(line) > MAX_LOG_LINE_BYTES:
                    raise CorruptTrajectoryError(
                        f"{path}: log line {len(entries) + 1} (stored step {len(entries)}) is "
                        f"longer than {MAX_LOG_LINE_BYTES} bytes")
                break   # no newline: an incomplete final write (or the file shrank)
            end = pos + len(line)
            entry, ok = None, False
            try:
                text, sep, crc = line[:-1].decode("utf-8").rpartition("\t")
                ok = bool(sep) and crc == f"{zlib.crc32(text.encode()):08x}"
                if ok:
                    entry = parse_json(text.encode(), Where(path))
            except (UnicodeDecodeError, CorruptTrajectoryError):
                ok = False
            if not ok and end >= size:
                break   # a damaged *last* line is what a power loss mid-append can leave
            s = len(entries)
            if not ok or not isinstance(entry, dict) or type(entry.get("step")) is not int \
                    or entry["step"] != s:
                raise CorruptTrajectoryError(
                    f"{path}: log line {s + 1} (stored step {s}) is corrupted (checksum mismatch "
                    "or wrong step number); the trajectory is damaged beyond the last step a "
                    "crash can leave incomplete")
            next_raw = validate_entry(entry, Where(path, line=s + 1), s, next_raw)
            entries.append(entry)
            pos = end
    return entries, pos


# Map a file copy-on-write from its *open descriptor* (/proc/self/fd/N names exactly the inode
# opened and checked, never a path in the directory): tensors then share the page cache, like
# safetensors' safe_open did, instead of being copied. Without /proc: pread into fresh memory.
_MAP_BY_FD = os.path.isdir("/proc/self/fd")


def _map_private(fd: int, nbytes: int) -> Optional[torch.Tensor]:
    """The whole file as a uint8 [nbytes] tensor on a private (copy-on-write) mapping; None if it
    cannot be mapped (then the caller reads with pread, which reports a file that shrank)."""
    try:
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", False, nbytes)
    except RuntimeError:
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class _FileState:
    """What one access learnt about a tensor file, valid while its identity is unchanged."""

    __slots__ = ("ident", "tensors", "data_start", "hashed")

    def __init__(self, ident, tensors, data_start, hashed):
        self.ident, self.tensors, self.data_start, self.hashed = ident, tensors, data_start, hashed


class Trajectory:
    """A recorded training run, read lazily (checksums on first access, validated throughout).

    Read API (the contract with the attribution engine)::

        traj.layout, traj.optimizer_kind ("adamw" | "adam" | "sgd"), traj.rule, traj.hyper
        traj.num_steps (N stored updates, states θ_0..θ_N), traj.checkpoint_every (k)
        traj.dataset_size (int or None), traj.dtype (storage dtype of θ and moments)
        traj.theta(s, dtype=None, device=None) -> [D] θ_s, s in 0..N
        traj.step(s) -> StepRecord of stored update s (θ_s → θ_{s+1}), s in 0..N-1
        traj.raw_steps(s) -> StepRecords of the raw optimizer steps inside stored update s
        traj.buffer_names, traj.buffers(s=None) -> {name: tensor} the model's buffers at state s
        (default: the last), traj.buffers_changed -> names of the buffers that changed in training

    With k = 1 a StepRecord carries the batch (indices, weights), clip factor, lr, weight decay,
    step count, the tensors without a gradient at that step (``inactive``) and their per-tensor
    step counts where they differ, and v_{s+1}; exp_avg is None unless the first moment was
    stored. Trajectories recorded before buffers were stored have ``buffer_names == ()``. With k > 1 the
    update spans several raw steps: ``step(s)`` carries lr / weight decay / step count of its last
    raw step, v and the first moment after it, and no batch (see ``raw_steps(s)``).
    Memory: reading a step materialises only the tensors asked for (each [D] or [B]).
    Every error about the files is a CorruptTrajectoryError naming the file (and log line/field).
    The object holds a descriptor of the directory until ``close()`` (or garbage collection).
    """

    def __init__(self, directory: str, manifest: dict, entries: List[dict], log_bytes: int,
                 check_on_access: bool = True, *, dir_fd: Optional[int] = None,
                 _manifest_checked: bool = False):
        """``entries`` as :func:`read_log` returns them; prefer :meth:`load`. Takes ownership of
        ``dir_fd`` (a descriptor of ``directory``) when given."""
        self._dir_fd: Optional[int] = None
        self.directory = directory
        self.check_on_access = check_on_access
        if not _manifest_checked:
            validate_manifest(manifest, os.path.join(directory, MANIFEST))
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
        self._store_first_moment = bool(manifest.get("store_first_moment", False))
        buffers = manifest.get("model_buffers") or {"names": [], "shapes": [], "dtypes": []}
        self.buffer_names: Tuple[str, ...] = tuple(buffers["names"])
        self._buffer_info = {n: (tuple(sh), dt) for n, sh, dt in
                             zip(buffers["names"], buffers["shapes"], buffers["dtypes"])}
        log = os.path.join(directory, LOG)
        for s, e in enumerate(entries):
            validate_entry_context(e, Where(log, line=s + 1), len(self.hyper),
                                   self.checkpoint_every, num_tensors=len(self.layout.names),
                                   buffer_names=self.buffer_names,
                                   second_moment=self.rule.has_second_moment)
        self._files: Dict[Optional[int], _FileState] = {}
        self._dir_fd = dir_fd if dir_fd is not None else _open_dir(directory)

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, directory: str, check_on_access: bool = True) -> "Trajectory":
        """Open a trajectory directory; every complete step is available (see module docstring).

        ``check_on_access``: verify each file's sha256 the first time it is read (reads the whole
        file once). Pass False to read only the tensors asked for from very large files: sizes,
        headers, dtypes and shapes are still checked, the bytes (and the values of batch indices
        and weights) are trusted until :meth:`check` or :meth:`verify`, which check everything."""
        dir_fd = _open_dir(directory)
        try:
            path = os.path.join(directory, MANIFEST)
            try:
                fd, st = _fs.open_regular(dir_fd, MANIFEST)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"'{directory}' holds no trajectory: {MANIFEST} is missing (recording never "
                    "started, or this is another directory)") from None
            except _fs.UnsafeEntry as e:
                raise _refused(path, "the manifest", e) from None
            try:
                if st.st_size > MAX_MANIFEST_BYTES:
                    raise CorruptTrajectoryError(f"{path}: {st.st_size} bytes, more than a "
                                                 f"manifest may have ({MAX_MANIFEST_BYTES})")
                raw = _fs.pread_exact(fd, st.st_size, 0)
            except EOFError as e:
                raise CorruptTrajectoryError(f"{path}: {e}") from None
            finally:
                os.close(fd)
            manifest = parse_json(raw, Where(path))
            validate_manifest(manifest, path)
            entries, log_bytes = _read_log_at(dir_fd, directory)
            return cls(directory, manifest, entries, log_bytes, check_on_access, dir_fd=dir_fd,
                       _manifest_checked=True)
        except BaseException:
            os.close(dir_fd)
            raise

    def close(self) -> None:
        """Release the directory descriptor (reads afterwards raise ValueError)."""
        fd, self._dir_fd = getattr(self, "_dir_fd", None), None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "Trajectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_dir_fd"], state["_files"] = None, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._dir_fd = _open_dir(self.directory)

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
    def _expected(self, s: Optional[int]) -> Tuple[str, str, int, str, str]:
        """(name, sha256, bytes, metadata step tag, description) of θ_0's file (s=None) or of
        stored update s's file: the names are canonical (checked at load)."""
        if s is None:
            info = self.manifest["init"]
            return INIT_FILE, info["sha256"], info["bytes"], "init", "θ_0"
        e = self._entries[s]
        return e["file"], e["sha256"], e["bytes"], str(s), f"stored step {s}"

    def _open(self, s: Optional[int], force_hash: bool = False) -> Tuple[int, _FileState, str, str]:
        """Open the tensor file of s (a regular file of exactly the recorded size), check its
        sha256 (first access, or when it changed since) and its header; returns (fd, state, path,
        description). The caller closes fd."""
        if self._dir_fd is None:
            raise ValueError(f"{self!r} is closed")
        name, sha, nbytes, tag, what = self._expected(s)
        path = os.path.join(self.directory, name)
        try:
            fd, st = _fs.open_regular(self._dir_fd, name)
        except FileNotFoundError:
            raise CorruptTrajectoryError(f"{path} ({what}) is missing") from None
        except _fs.UnsafeEntry as e:
            raise _refused(path, what, e) from None
        try:
            ident = _fs.identity(st)
            state = self._files.get(s)
            if state is None or state.ident != ident:
                if st.st_size != nbytes:
                    raise CorruptTrajectoryError(
                        f"{path} ({what}) is corrupted or truncated: {st.st_size} bytes, the "
                        f"{'manifest' if s is None else 'log'} records {nbytes}")
                hashed = self.check_on_access or force_hash
                if hashed:
                    self._check_sha(fd, nbytes, sha, path, what)
                tensors, data_start = self._header(fd, nbytes, s, tag, path, what)
                state = _FileState(ident, tensors, data_start, hashed)
                self._files[s] = state
            elif force_hash and not state.hashed:
                self._check_sha(fd, nbytes, sha, path, what)
                state.hashed = True
            return fd, state, path, what
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _check_sha(fd: int, nbytes: int, sha: str, path: str, what: str) -> None:
        try:
            got = _fs.sha256_of(fd, nbytes)
        except EOFError as e:
            raise CorruptTrajectoryError(f"{path} ({what}) is corrupted or truncated: {e}") \
                from None
        if got != sha:
            raise CorruptTrajectoryError(
                f"{path} ({what}) is corrupted or truncated: sha256 {got[:16]}… does "
                f"not match the recorded {sha[:16]}…")

    def _header(self, fd: int, nbytes: int, s: Optional[int], tag: str, path: str,
                what: str) -> Tuple[Dict[str, TensorInfo], int]:
        """Parse and check the safetensors header: bounded, tiling the file, the expected
        metadata, and every tensor the reader knows with the manifest's dtype and shape."""
        w = Where(f"{path} ({what}) safetensors header")
        try:
            hl = int.from_bytes(_fs.pread_exact(fd, 8, 0), "little")
            if hl > min(MAX_HEADER_BYTES, nbytes - 8):
                w.fail(f"header length {hl} exceeds the file ({nbytes} bytes) or the bound "
                       f"({MAX_HEADER_BYTES})")
            raw = _fs.pread_exact(fd, hl, 8)
        except EOFError as e:
            raise CorruptTrajectoryError(f"{path} ({what}) is corrupted or truncated: {e}") \
                from None
        tensors, meta = parse_header(raw, nbytes - 8 - hl, w)
        for key, want in (("format", FORMAT_NAME), ("format_version", str(FORMAT_VERSION)),
                          ("step", tag)):
            if meta.get(key) != want:
                w.at("__metadata__", key).fail(f"expected {want!r}, got {meta.get(key)!r} (a file "
                                               f"of another trajectory or step?)")
        D, code = self.layout.D, ST_CODE[str(self.dtype).replace("torch.", "")]
        expected: Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]] = {"theta": ((code,), (D,))}
        required = {"theta"}
        # recorded buffers: all of them in θ_0's file, the changed ones in a step's file
        changed = self.buffer_names if s is None else (self._entries[s].get("buffers_changed")
                                                        or ())
        for name in changed:
            shape, dt = self._buffer_info[name]
            expected[BUFFER_PREFIX + name] = ((ST_CODE[dt],), shape)
            required.add(BUFFER_PREFIX + name)
        if s is not None:
            raw_steps = self._entries[s]["raw"]
            expected["exp_avg"] = ((code,), (D,))
            if self.rule.has_second_moment:
                expected["exp_avg_sq"] = ((code,), (D,))
                required.add("exp_avg_sq")
            if (self.checkpoint_every > 1 or self._store_first_moment
                    or any(lr == 0.0 for r in raw_steps for lr in r["lr"])):
                required.add("exp_avg")   # the recorder stores it then, and the replay needs it
            for j, r in enumerate(raw_steps):
                B = r["batch_size"]
                expected[f"batch_indices.{j}"] = (("I32", "I64"), (B,))
                required.add(f"batch_indices.{j}")
                if r.get("uniform_weight") is None:
                    expected[f"batch_weights.{j}"] = (("F64",), (B,))
                    required.add(f"batch_weights.{j}")
        for name in sorted(required - set(tensors)):
            w.at(name).fail("missing")
        for name, t in tensors.items():
            if name in expected:
                codes, shape = expected[name]
                if t.code not in codes or t.shape != shape:
                    w.at(name).fail(f"expected {' or '.join(codes)} of shape {list(shape)}, got "
                                    f"{t.code} of shape {list(t.shape)}")
            elif name in _RESERVED or name.startswith("batch_") or \
                    name.startswith(BUFFER_PREFIX):
                w.at(name).fail("not expected in this file (checkpoint_every, the optimizer or the "
                                "log line says otherwise)")
            # any other name: a field of a later version of the format, never read
        return tensors, 8 + hl

    def _check_file(self, s: Optional[int], force: bool = False) -> None:
        fd, _, _, _ = self._open(s, force_hash=force)
        os.close(fd)

    def check(self) -> None:
        """Verify the checksum, header and batch values of every file now; raises
        CorruptTrajectoryError naming the first bad file and its step."""
        self._check_file(None, force=True)
        for s in range(self.num_steps):
            self._check_file(s, force=True)
            self._read(s, [f"batch_{kind}.{j}" for j in range(len(self._entries[s]["raw"]))
                           for kind in ("indices", "weights")])

    def _read(self, s: Optional[int], keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        fd, state, path, what = self._open(s)
        try:
            out, mapped = {}, None
            for k in keys:
                t = state.tensors.get(k)
                if t is None:
                    continue
                dtype, size = ST_DTYPES[t.code]
                off, n = state.data_start + t.begin, t.end - t.begin
                if n and off % size == 0 and _MAP_BY_FD and mapped is None:
                    mapped = _map_private(fd, state.ident[2])
                if n and off % size == 0 and mapped is not None:
                    x = mapped[off:off + n]
                else:
                    x = torch.empty(n, dtype=torch.uint8)
                    if n:
                        try:
                            _fs.pread_into(fd, memoryview(x.numpy()), off)
                        except EOFError as e:
                            raise CorruptTrajectoryError(f"{path} ({what}) is corrupted or "
                                                         f"truncated: {e}") from None
                out[k] = x.view(dtype).reshape(t.shape)
            for k, x in out.items():
                if k.startswith("batch_indices."):
                    out[k] = x = x.to(torch.int64)
                if state.hashed:   # see _check_values
                    self._check_values(k, x, path, what)
            return out
        finally:
            os.close(fd)

    def _check_values(self, k: str, x: torch.Tensor, path: str, what: str) -> None:
        """Batch indices in [0, dataset_size), weights finite. Applied to files whose sha256 was
        verified (check_on_access=True, or after check()): with check_on_access=False the reader
        trusts the bytes it does not hash, as it does for θ, and check()/verify() catch them."""
        if k.startswith("batch_indices."):
            lo, hi = int(x.min()), int(x.max())
            N = self.dataset_size
            if lo < 0 or (N is not None and hi >= N):
                bad = lo if lo < 0 else hi
                raise CorruptTrajectoryError(
                    f"{path} ({what}): tensor '{k}': index {bad} is outside the dataset "
                    f"[0, {N if N is not None else '∞'})")
        elif k.startswith("batch_weights.") and not bool(torch.isfinite(x).all()):
            raise CorruptTrajectoryError(f"{path} ({what}): tensor '{k}' has non-finite weights")

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
        # a view into the step file's mapping is copied, so that θ owns its memory (the mapping,
        # header and other tensors included, is released now instead of living as long as θ)
        return own_storage(t.to(dtype=dtype or t.dtype, device=device))

    def raw_steps(self, s: int) -> List[StepRecord]:
        """The raw optimizer steps inside stored update s: scalars and batches, no tensors of size
        D. ``index`` is the raw step's global index. One element when checkpoint_every == 1."""
        s = self._check_index(s, self.num_steps, "step")
        raw = self._entries[s]["raw"]
        keys = [f"batch_{kind}.{j}" for j in range(len(raw)) for kind in ("indices", "weights")]
        t = self._read(s, keys)
        return [StepRecord(index=r["index"], step_count=r["step_count"], lr=list(r["lr"]),
                           weight_decay=list(r["weight_decay"]),
                           clip_factor=float(r["clip_factor"]), **self._batch(t, r, j),
                           **self._activity(r))
                for j, r in enumerate(raw)]

    @staticmethod
    def _activity(r: dict) -> dict:
        """StepRecord fields of the tensors without a gradient (absent: every tensor active)."""
        counts = r.get("tensor_step_counts")
        return {"inactive": tuple(r.get("inactive") or ()),
                "tensor_step_counts": None if counts is None else tuple(counts)}

    @staticmethod
    def _batch(t: Dict[str, torch.Tensor], r: dict, j: int) -> Dict[str, torch.Tensor]:
        idx = t[f"batch_indices.{j}"]
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
                          exp_avg_sq=t.get("exp_avg_sq"), exp_avg=t.get("exp_avg"), **batch,
                          **self._activity(last))

    # ------------------------------------------------------------------ buffers
    @property
    def buffers_changed(self) -> Tuple[str, ...]:
        """Names of the recorded buffers whose value changed during training (BatchNorm running
        statistics, counters), in manifest order: then the model's function changed not only
        through θ, and every step is evaluated with the final buffers."""
        seen = set()
        for e in self._entries:
            seen.update(e.get("buffers_changed") or ())
        return tuple(n for n in self.buffer_names if n in seen)

    def buffers(self, s: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The model's recorded buffers {name: tensor} at state s (0..num_steps; default the last,
        i.e. the final buffers of the run, or of its last stored update if it was killed). A
        buffer is stored in θ_0's file and again in the file of every stored update after which
        it had changed; its value at s is the latest of those up to s."""
        s = self.num_steps if s is None else self._check_index(s, self.num_steps + 1, "state")
        where: Dict[Optional[int], List[str]] = {}
        for name in self.buffer_names:
            at = None
            for k in range(s - 1, -1, -1):
                if name in (self._entries[k].get("buffers_changed") or ()):
                    at = k
                    break
            where.setdefault(at, []).append(name)
        out: Dict[str, torch.Tensor] = {}
        for at, names in where.items():
            t = self._read(at, [BUFFER_PREFIX + n for n in names])
            out.update({n: t[BUFFER_PREFIX + n].clone() for n in names})
        return {n: out[n] for n in self.buffer_names}

    # ------------------------------------------------------------------ replay
    def verify(self, model: Optional[torch.nn.Module] = None) -> VerifyReport:
        """Replay every stored update from the stored state: see :func:`explaind_fast.store.verify`."""
        return verify(self, model)
