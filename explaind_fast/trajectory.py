"""The on-disk trajectory: format, crash-safe writing, lazy memory-mapped reading, checksums, replay.

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

Sign convention of the library (for the engine built on this): results are contributions to the
*change*, final = initial + kernel.sum() + reg.sum(); the paper's ψ is minus this.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import math
import os
import queue
import threading
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

from .layout import ParamLayout
from .optim_rules import OptimizerRule, StepRecord, make_rule

FORMAT_NAME = "explaind_fast.trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOG = "steps.jsonl"
INIT_FILE = "theta_0.safetensors"


class CorruptTrajectoryError(ValueError):
    """A trajectory file or log line does not match its checksum, or is missing."""


def step_file_name(s: int) -> str:
    return f"step_{s:08d}.safetensors"


# ---------------------------------------------------------------------------------------- writing
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


# ---------------------------------------------------------------------------------------- reading
@dataclass
class VerifyReport:
    """Result of :meth:`Trajectory.verify`; lists have one entry per stored update s.

    Attributes:
        mode: how the update was replayed (see Trajectory.verify).
        theta_error: max_i |θ_{s+1} − θ'_{s+1}| (replayed from stored data), NaN if not replayable.
        moment_error: Adam-type: max_i |v_{s+1} − v'_{s+1}| / max_i v_{s+1} (the stored second
            moment against its replay from the gradient implied by the stored data); NaN otherwise.
        step_size: max_i |θ_{s+1} − θ_s|, to judge theta_error against.
        notes: anything that limits the check.
    """

    mode: List[str] = field(default_factory=list)
    theta_error: List[float] = field(default_factory=list)
    moment_error: List[float] = field(default_factory=list)
    step_size: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def max_theta_error(self) -> float:
        vals = [e for e in self.theta_error if not math.isnan(e)]
        return max(vals) if vals else float("nan")

    @property
    def max_moment_error(self) -> float:
        vals = [e for e in self.moment_error if not math.isnan(e)]
        return max(vals) if vals else float("nan")

    def __str__(self) -> str:
        n = len(self.theta_error)
        return (f"VerifyReport({n} steps: max |θ_(s+1) − replayed| = {self.max_theta_error:.3g}, "
                f"max relative second-moment error = {self.max_moment_error:.3g}"
                + ("; " + "; ".join(self.notes) if self.notes else "") + ")")


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
        """Replay every stored update from the stored state; per-step errors in a VerifyReport.

        Checks all checksums, and the model's parameter names, shapes and order when ``model`` is
        given (ValueError naming the parameter on mismatch). Then, in float64, with the recursions
        of optim_rules (E_s the data part of the first moment, R_s the decay part):

        * mode "stored-m" (first moment stored, k = 1): E_s from the stored moment, the
          gradient G_s = (E_s − decay·E_{s−1})/gain, v'_{s+1} = β2 v_s + (1−β2) u_s² with
          u = G (AdamW) or G + λθ_s (Adam-L2), θ'_{s+1} = θ_s − scale'·E_s − r'_s with scale'
          from v'. An honest replay: a wrong lr, β, ε, weight decay or a corrupted v shows in
          theta_error.
        * mode "derived-m" (the default k = 1 recording): E_s is derived from the step identity
          (E_s = −(Δ_s + r_s)/scale_s), then as above. θ' then matches by construction, and
          moment_error carries the check: a wrong lr, β, ε, weight decay or a corrupted v makes
          the implied gradient inconsistent with the stored v. For SGD nothing stored is redundant
          with θ in this mode, so only checksums, finiteness and step counters are checked.
        * checkpoint_every > 1: intermediate states are not stored, so updates cannot be replayed;
          checksums, finiteness and step counters are checked and the errors are NaN.

        Rounding: the implied gradient carries θ_{s+1}'s rounding (eps·|θ|) relative to the step
        (|Δ|), amplified by 1/(1−β1), so expect moment_error up to about eps·|θ|/|Δ|/(1−β1):
        ≲ 1e-12 for float64 runs with ordinary steps, ≲ 1e-4 for float32 runs; theta_error up
        to a few eps·|θ| plus that times |Δ| (tests/test_recorder.py states the bounds). A
        wrong lr, β, ε or weight decay shows as errors orders of magnitude above.
        Peak memory: about 8 float64 [D] vectors.
        """
        if model is not None:
            self.layout.check_model(model)
        self.check()
        report = VerifyReport()
        f64 = torch.float64
        kind, rule, D = self.optimizer_kind, self.rule, self.layout.D
        adam = rule.has_second_moment
        replayable = self.checkpoint_every == 1
        if not replayable:
            report.notes.append("checkpoint_every > 1: intermediate states not stored, updates "
                                "not replayable (checksums, finiteness and counters checked)")
        if adam:
            b2 = self.layout.expand([h["betas"][1] for h in self.hyper])
        R = torch.zeros(D, dtype=f64)
        E_prev = torch.zeros(D, dtype=f64)
        v_prev = torch.zeros(D, dtype=f64)
        expected_count = None
        theta_next = self.theta(0, dtype=f64)
        for s in range(self.num_steps):
            rec = self.step(s)
            theta_s, theta_next = theta_next, self.theta(s + 1, dtype=f64)
            for name, t in (("θ", theta_next), ("exp_avg_sq", rec.exp_avg_sq),
                            ("exp_avg", rec.exp_avg)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"stored step {s}: {name} has non-finite entries")
            raws = self._entries[s]["raw"]
            for r in raws:
                if expected_count is not None and r["step_count"] != expected_count:
                    raise ValueError(f"stored step {s}: raw step {r['index']} has step count "
                                     f"{r['step_count']}, expected {expected_count}")
                expected_count = r["step_count"] + 1
            delta = theta_next - theta_s
            report.step_size.append(float(delta.abs().max()) if D else 0.0)
            if not replayable:
                report.mode.append("not-replayable")
                report.theta_error.append(float("nan"))
                report.moment_error.append(float("nan"))
                continue
            c = rule.coefficients(rec, dtype=f64)
            R = c.reg_decay * R + c.reg_gain * theta_s
            if rec.exp_avg is not None:
                m = rec.exp_avg.to(f64)
                E = m - R if rule.moment_includes_reg else m
                report.mode.append("stored-m")
            else:
                E = -(delta + c.reg_scale * R) / c.scale
                report.mode.append("derived-m")
            if adam:
                G = (E - c.decay * E_prev) / c.gain
                u = rule.second_moment_input(rec, G, theta_s)
                v = rec.exp_avg_sq.to(f64)
                v_replay = b2 * v_prev + (1 - b2) * u * u
                c_replay = rule.coefficients(dataclasses.replace(rec, exp_avg_sq=v_replay),
                                             dtype=f64)
                replay = theta_s - c_replay.scale * E - c_replay.reg_scale * R
                vmax = float(v.abs().max())
                report.moment_error.append(float((v - v_replay).abs().max()) / vmax
                                           if vmax > 0 else float((v - v_replay).abs().max()))
                v_prev = v
            else:
                replay = theta_s - c.scale * E - c.reg_scale * R
                report.moment_error.append(float("nan"))
            report.theta_error.append(float((theta_next - replay).abs().max()) if D else 0.0)
            E_prev = E
        if kind == "sgd" and "derived-m" in report.mode:
            report.notes.append("SGD without a stored momentum buffer: the replay is exact by "
                                "construction; only checksums, finiteness and counters are checked")
        return report
