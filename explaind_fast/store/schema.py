"""Validation of everything the reader parses: the manifest, the log lines, safetensors headers.

Each check raises :class:`CorruptTrajectoryError` naming the file, (for the log) the line and the
stored step, and the field: ``<path>: line 3 (stored step 2): field 'raw[0].lr[1]': expected a
number, got 'x'``. Fields are checked by type and range; unknown extra keys are tolerated (optional
fields may be added to the format later). Values the recorder writes without judging them (a NaN
or negative learning rate, say) load, and :func:`explaind_fast.store.verify` refuses them.
Format: :mod:`.format`; threat model there.
"""
from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..optim import RULES
from .format import FORMAT_NAME, FORMAT_VERSION, INIT_FILE, MAX_PARAMETERS, \
    CorruptTrajectoryError, manifest_checksum, step_file_name

STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: dtypes a recorded buffer may have (the model's own; stored as is)
BUFFER_DTYPES = ("float16", "bfloat16", "float32", "float64", "int64", "int32", "int16", "int8",
                 "uint8", "bool")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_DIMS = 64
_BIG = 2 ** 62   # bound on sizes and counts (keeps every later float() / arithmetic finite)

# safetensors dtype code -> (torch dtype or None if never read, item size)
ST_DTYPES: Dict[str, Tuple[Optional[torch.dtype], int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1), "U16": (None, 2), "U32": (None, 4), "U64": (None, 8),
    "F8_E4M3": (None, 1), "F8_E5M2": (None, 1), "C64": (None, 8)}
ST_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
           "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
           "bool": "BOOL"}
BUFFER_PREFIX = "model_buffer."   # tensor name of a recorded buffer: the prefix + its name


class Where:
    """Names a place in a file for error messages: ``Where(path).at("raw", 0, "lr")``; with
    ``line``, a line of the log (stored step line - 1). Built lazily: nothing is formatted unless
    a check fails."""

    __slots__ = ("prefix", "line", "path")

    def __init__(self, prefix: str, path: Tuple = (), line: Optional[int] = None):
        self.prefix, self.path, self.line = prefix, path, line

    def at(self, *keys) -> "Where":
        return Where(self.prefix, self.path + keys, self.line)

    def field(self) -> str:
        out = ""
        for k in self.path:
            out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
        return out

    def fail(self, what: str):
        f = self.field()
        where = self.prefix if self.line is None else \
            f"{self.prefix}: line {self.line} (stored step {self.line - 1})"
        raise CorruptTrajectoryError(f"{where}: " + (f"field '{f}': " if f else "") + what)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def _show(v: Any) -> str:
    """A short repr of a value from a file (bounded in size and nesting, never recursing)."""
    return _REPR.repr(v)


def _got(v: Any) -> str:
    return f"got {type(v).__name__} {_show(v)}"


def parse_json(raw: bytes, where: Where) -> Any:
    """JSON text -> value; invalid UTF-8 / JSON / nesting too deep: CorruptTrajectoryError."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        where.fail(f"not valid JSON ({type(e).__name__}: {str(e)[:120]})")


# The need_* helpers take the place as ``w, *keys`` and build its name only when they fail (they
# run for every field of every log line).
def need_dict(v, w: Where, *keys) -> dict:
    if type(v) is not dict:
        w.at(*keys).fail(f"expected an object, {_got(v)}")
    return v


def need_key(d: dict, key: str, w: Where, *keys):
    try:
        return d[key]
    except KeyError:
        w.at(*keys, key).fail("missing")


def need_list(v, w: Where, *keys, n: Optional[int] = None, min_len: int = 0) -> list:
    if type(v) is not list:
        w.at(*keys).fail(f"expected a list, {_got(v)}")
    if n is not None and len(v) != n:
        w.at(*keys).fail(f"expected {n} entries, got {len(v)}")
    if len(v) < min_len:
        w.at(*keys).fail(f"expected at least {min_len} entries, got {len(v)}")
    return v


def need_int(v, w: Where, *keys, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if type(v) is not int:   # not bool, not float
        w.at(*keys).fail(f"expected an integer, {_got(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        w.at(*keys).fail(f"expected an integer {rng}, got {v}")
    return v


def need_number(v, w: Where, *keys, finite: bool = True, lo: Optional[float] = None,
                hi_open: Optional[float] = None) -> float:
    t = type(v)
    if t is not float and t is not int:
        w.at(*keys).fail(f"expected a number, {_got(v)}")
    x = float(v)
    if finite and not math.isfinite(x):
        w.at(*keys).fail(f"expected a finite number, got {x}")
    if lo is not None and not x >= lo:
        w.at(*keys).fail(f"expected a number >= {lo}, got {x}")
    if hi_open is not None and not x < hi_open:
        w.at(*keys).fail(f"expected a number < {hi_open}, got {x}")
    return x


def need_numbers(v, w: Where, *keys, n: Optional[int] = None, min_len: int = 0,
                 finite: bool = True) -> List[float]:
    """A list of numbers, as floats."""
    need_list(v, w, *keys, n=n, min_len=min_len)
    out = []
    for i, x in enumerate(v):
        t = type(x)
        if (t is float or t is int) and not finite:
            out.append(float(x))
        else:
            out.append(need_number(x, w, *keys, i, finite=finite))
    return out


def need_str(v, w: Where, *keys) -> str:
    if type(v) is not str:
        w.at(*keys).fail(f"expected a string, {_got(v)}")
    return v


def need_sha(v, w: Where, *keys) -> str:
    if type(v) is not str or not _HEX64.fullmatch(v):
        w.at(*keys).fail(f"expected a sha256 (64 lowercase hex digits), {_got(v)}")
    return v


# ---------------------------------------------------------------------------------- manifest
def validate_manifest(m: Any, path: str) -> None:
    """Check every field the reader uses (format, version, checksum, layout, optimizer, sizes).

    Raises CorruptTrajectoryError naming the field; unknown extra fields are tolerated."""
    w = Where(path)
    need_dict(m, w)
    if m.get("format") != FORMAT_NAME:
        w.fail(f"not an explaind_fast trajectory manifest (format {_show(m.get('format'))})")
    version = m.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        w.fail(f"trajectory format version {_show(version)} is not supported by this version "
               f"(reads {FORMAT_VERSION})")
    try:
        checksum = manifest_checksum(m)
    except (RecursionError, ValueError):   # nested deeper than json can write back
        w.fail("the manifest is nested too deeply")
    if m.get("sha256") != checksum:
        w.fail("the manifest does not match its checksum (edited or corrupted)")

    opt = need_dict(need_key(m, "optimizer", w), w, "optimizer")
    kind = need_str(need_key(opt, "kind", w, "optimizer"), w, "optimizer", "kind")
    if kind not in RULES:
        w.at("optimizer", "kind").fail(f"unknown optimizer kind {kind!r}; supported: "
                                      f"{sorted(RULES)}")
    if "class" in opt:
        need_str(opt["class"], w, "optimizer", "class")
    hyper = need_list(need_key(opt, "hyper", w, "optimizer"), w, "optimizer", "hyper", min_len=1)
    for gi, h in enumerate(hyper):
        wh = w.at("optimizer", "hyper", gi)
        need_dict(h, wh)
        if RULES[kind].has_second_moment:
            betas = need_list(need_key(h, "betas", wh), wh, "betas", n=2)
            for j, b in enumerate(betas):
                need_number(b, wh, "betas", j, lo=0.0, hi_open=1.0)
            need_number(need_key(h, "eps", wh), wh, "eps", lo=0.0)
        else:
            need_number(need_key(h, "momentum", wh), wh, "momentum", lo=0.0)
            if "dampening" in h and need_number(h["dampening"], wh, "dampening") != 0.0:
                wh.at("dampening").fail(f"expected 0 (dampening is not supported), got "
                                        f"{h['dampening']}")
            if "nesterov" in h and h["nesterov"] is not False:
                wh.at("nesterov").fail(f"expected false, {_got(h['nesterov'])}")

    wl = w.at("layout")
    lay = need_dict(need_key(m, "layout", w), wl)
    names = need_list(need_key(lay, "names", wl), wl, "names", min_len=1)
    n = len(names)
    for i, name in enumerate(names):
        need_str(name, wl, "names", i)
    if len(set(names)) != n:
        wl.at("names").fail("parameter names are not unique")
    shapes = need_list(need_key(lay, "shapes", wl), wl, "shapes", n=n)
    D = 0
    for i, shape in enumerate(shapes):
        need_list(shape, wl, "shapes", i)
        if len(shape) > _MAX_DIMS:
            wl.at("shapes", i).fail(f"more than {_MAX_DIMS} dimensions")
        numel = 1
        for j, d in enumerate(shape):
            numel *= need_int(d, wl, "shapes", i, j, lo=0, hi=MAX_PARAMETERS)
        D += numel
        if D > MAX_PARAMETERS:
            wl.at("shapes").fail(f"more than {MAX_PARAMETERS} parameters")
    if D == 0:
        wl.at("shapes").fail("the layout has no parameters (D = 0)")
    dtypes = need_list(need_key(lay, "dtypes", wl), wl, "dtypes", n=n)
    for i, dt in enumerate(dtypes):
        if dt not in STORAGE_DTYPES:
            wl.at("dtypes", i).fail(f"expected one of {STORAGE_DTYPES}, {_got(dt)}")
    groups = need_list(need_key(lay, "group_of_tensor", wl), wl, "group_of_tensor", n=n)
    for i, g in enumerate(groups):
        need_int(g, wl, "group_of_tensor", i, lo=0, hi=len(hyper) - 1)

    dtype = need_key(m, "dtype", w)
    if dtype not in STORAGE_DTYPES:
        w.at("dtype").fail(f"expected one of {STORAGE_DTYPES}, {_got(dtype)}")
    widest = getattr(torch, dtypes[0])
    for dt in dtypes[1:]:
        widest = torch.promote_types(widest, getattr(torch, dt))
    if getattr(torch, dtype) != widest:
        w.at("dtype").fail(f"the storage dtype {dtype} is not the widest parameter dtype "
                           f"{str(widest).replace('torch.', '')}")
    need_int(need_key(m, "checkpoint_every", w), w, "checkpoint_every", lo=1, hi=_BIG)
    if "store_first_moment" in m and type(m["store_first_moment"]) is not bool:
        w.at("store_first_moment").fail(f"expected true or false, {_got(m['store_first_moment'])}")
    if m.get("dataset_size") is not None:
        need_int(m["dataset_size"], w, "dataset_size", lo=1, hi=_BIG)
    for key in ("torch_version", "created"):
        if key in m:
            need_str(m[key], w, key)
    if m.get("model_buffers") is not None:
        wb = w.at("model_buffers")
        buf = need_dict(m["model_buffers"], wb)
        bnames = need_list(need_key(buf, "names", wb), wb, "names")
        for i, name in enumerate(bnames):
            need_str(name, wb, "names", i)
        if len(set(bnames)) != len(bnames):
            wb.at("names").fail("buffer names are not unique")
        bshapes = need_list(need_key(buf, "shapes", wb), wb, "shapes", n=len(bnames))
        for i, shape in enumerate(bshapes):
            need_list(shape, wb, "shapes", i)
            if len(shape) > _MAX_DIMS:
                wb.at("shapes", i).fail(f"more than {_MAX_DIMS} dimensions")
            for j, d in enumerate(shape):
                need_int(d, wb, "shapes", i, j, lo=0, hi=MAX_PARAMETERS)
        bdtypes = need_list(need_key(buf, "dtypes", wb), wb, "dtypes", n=len(bnames))
        for i, dt in enumerate(bdtypes):
            if dt not in BUFFER_DTYPES:
                wb.at("dtypes", i).fail(f"expected one of {BUFFER_DTYPES}, {_got(dt)}")
    init = need_dict(need_key(m, "init", w), w, "init")
    if need_key(init, "file", w, "init") != INIT_FILE:
        w.at("init", "file").fail(f"expected {INIT_FILE!r} (the only name θ_0 may have), "
                                  f"{_got(init['file'])}")
    need_sha(need_key(init, "sha256", w, "init"), w, "init", "sha256")
    need_int(need_key(init, "bytes", w, "init"), w, "init", "bytes", lo=8, hi=_BIG)


# ---------------------------------------------------------------------------------- log lines
def validate_entry(e: Any, w: Where, s: int, next_raw: int) -> int:
    """Context-free checks of the log entry of stored step ``s`` (``w`` names its line); converts
    numbers to float in place. Returns the raw index that must follow."""
    need_dict(e, w)
    if need_key(e, "file", w) != step_file_name(s):
        w.at("file").fail(f"expected {step_file_name(s)!r} (the only name stored step {s}'s "
                          f"file may have), {_got(e['file'])}")
    need_sha(need_key(e, "sha256", w), w, "sha256")
    need_int(need_key(e, "bytes", w), w, "bytes", lo=8, hi=_BIG)
    if "time" in e:
        need_number(e["time"], w, "time", finite=False)
    raw = need_list(need_key(e, "raw", w), w, "raw", min_len=1)
    for j, r in enumerate(raw):
        need_dict(r, w, "raw", j)
        need_int(need_key(r, "index", w, "raw", j), w, "raw", j, "index", lo=next_raw,
                 hi=next_raw)
        next_raw += 1
        need_int(need_key(r, "step_count", w, "raw", j), w, "raw", j, "step_count", lo=1,
                 hi=2**53)
        # lr / weight decay as recorded, NaN, Inf and negatives included: verify() judges them
        lr = r["lr"] = need_numbers(need_key(r, "lr", w, "raw", j), w, "raw", j, "lr",
                                    min_len=1, finite=False)
        r["weight_decay"] = need_numbers(need_key(r, "weight_decay", w, "raw", j), w, "raw", j,
                                         "weight_decay", n=len(lr), finite=False)
        r["clip_factor"] = need_number(need_key(r, "clip_factor", w, "raw", j), w, "raw", j,
                                       "clip_factor")
        need_int(need_key(r, "batch_size", w, "raw", j), w, "raw", j, "batch_size", lo=1,
                 hi=_BIG)
        if r.get("uniform_weight") is not None:
            r["uniform_weight"] = need_number(r["uniform_weight"], w, "raw", j, "uniform_weight")
        # optional (parameters without a gradient at this step, docs/design.md §3): the layout
        # indices of the skipped tensors, strictly increasing; torch's per-tensor step counts
        if r.get("inactive") is not None:
            inactive = need_list(r["inactive"], w, "raw", j, "inactive")
            prev = -1
            for i, t in enumerate(inactive):
                need_int(t, w, "raw", j, "inactive", i, lo=prev + 1, hi=_BIG)
                prev = t
        if r.get("tensor_step_counts") is not None:
            counts = need_list(r["tensor_step_counts"], w, "raw", j, "tensor_step_counts")
            for i, t in enumerate(counts):
                need_int(t, w, "raw", j, "tensor_step_counts", i, lo=0, hi=r["step_count"])
    if e.get("buffers_changed") is not None:
        changed = need_list(e["buffers_changed"], w, "buffers_changed", min_len=1)
        for i, name in enumerate(changed):
            need_str(name, w, "buffers_changed", i)
        if len(set(changed)) != len(changed):
            w.at("buffers_changed").fail("buffer names are not unique")
    return next_raw


def validate_entry_context(e: dict, w: Where, num_groups: int, checkpoint_every: int,
                           num_tensors: Optional[int] = None, buffer_names=None,
                           second_moment: bool = True) -> None:
    """Checks of a log entry against the manifest (param groups, checkpoint_every, the number of
    tensors of the layout, the recorded buffers, whether the optimizer keeps step counts)."""
    raw = e["raw"]
    if len(raw) > checkpoint_every:
        w.at("raw").fail(f"{len(raw)} raw steps in one stored update, checkpoint_every is "
                         f"{checkpoint_every}")
    for j, r in enumerate(raw):
        for key in ("lr", "weight_decay"):
            if len(r[key]) != num_groups:
                w.at("raw", j, key).fail(f"expected {num_groups} entries (one per param group), "
                                         f"got {len(r[key])}")
        if num_tensors is not None:
            inactive = r.get("inactive") or []
            if inactive and inactive[-1] >= num_tensors:
                w.at("raw", j, "inactive").fail(f"tensor index {inactive[-1]} is outside the "
                                                f"layout's {num_tensors} tensors")
            counts = r.get("tensor_step_counts")
            if counts is not None:
                if not second_moment:
                    w.at("raw", j, "tensor_step_counts").fail(
                        "not expected: the optimizer keeps no per-tensor step counts")
                if len(counts) != num_tensors:
                    w.at("raw", j, "tensor_step_counts").fail(
                        f"expected {num_tensors} entries (one per tensor), got {len(counts)}")
    if e.get("buffers_changed") is not None:
        known = set(buffer_names or ())
        for i, name in enumerate(e["buffers_changed"]):
            if name not in known:
                w.at("buffers_changed", i).fail(f"buffer {_show(name)} is not in the manifest's "
                                                "buffers")


# ---------------------------------------------------------------------------------- headers
class TensorInfo:
    __slots__ = ("code", "shape", "begin", "end")

    def __init__(self, code, shape, begin, end):
        self.code, self.shape, self.begin, self.end = code, shape, begin, end


def parse_header(raw: bytes, data_len: int, w: Where) -> Tuple[Dict[str, TensorInfo], dict]:
    """A safetensors JSON header -> ({name: TensorInfo}, metadata), checked like safetensors
    does (known dtypes, non-negative shapes, byte ranges matching the shapes, tiling the data
    region exactly)."""
    h = need_dict(parse_json(raw, w), w)
    meta = h.get("__metadata__", {})
    need_dict(meta, w, "__metadata__")
    for k, v in meta.items():
        need_str(v, w, "__metadata__", k)
    out: Dict[str, TensorInfo] = {}
    for name, info in h.items():
        if name == "__metadata__":
            continue
        need_dict(info, w, name)
        code = need_key(info, "dtype", w, name)
        if type(code) is not str or code not in ST_DTYPES:
            w.at(name, "dtype").fail(f"unknown safetensors dtype {_show(code)}")
        shape = need_list(need_key(info, "shape", w, name), w, name, "shape")
        if len(shape) > _MAX_DIMS:
            w.at(name, "shape").fail(f"more than {_MAX_DIMS} dimensions")
        numel = 1
        for j, d in enumerate(shape):
            numel *= need_int(d, w, name, "shape", j, lo=0, hi=data_len)
        offs = need_list(need_key(info, "data_offsets", w, name), w, name, "data_offsets", n=2)
        b = need_int(offs[0], w, name, "data_offsets", 0, lo=0, hi=data_len)
        e = need_int(offs[1], w, name, "data_offsets", 1, lo=b, hi=data_len)
        if numel * ST_DTYPES[code][1] != e - b:
            w.at(name).fail(f"{e - b} data bytes for {code} of shape {shape}")
        out[name] = TensorInfo(code, tuple(shape), b, e)
    pos = 0
    for name, t in sorted(out.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            w.at(name, "data_offsets").fail(f"tensors do not tile the data region (starts at "
                                            f"{t.begin}, expected {pos})")
        pos = t.end
    if pos != data_len:
        w.fail(f"the tensors cover {pos} of the {data_len} data bytes")
    return out, meta
