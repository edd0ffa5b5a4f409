"""Fuzzing the store: random corruptions of a recorded trajectory (bytes, fields, files, links)
must each be refused with the store's error or load to identical numbers — never a wrong number,
a hang, or a read outside the directory.

Every example copies one of two recorded templates (AdamW float64 with per-sample weights and a
stored first moment; SGD float32 with checkpoint_every=2), applies one corruption, then loads it
and reads everything (every θ, step, raw step, check(), verify()) under

* a SIGALRM guard (a hang fails the example instead of blocking CI),
* an audit hook on ``open`` (os.open and io.open): while reading, the store may open only the
  directory itself and its canonical file names, read-only and with O_NOFOLLOW; nothing outside
  (a link is never followed: O_NOFOLLOW, and the links category checks that every link at a name
  the store reads is refused),

and checks, per category:

* bytes  (bit flips, byte writes, truncation, insertion, deletion, line surgery in the log; no
  checksum is fixed): refused with CorruptTrajectoryError, or every value read equals the
  template's; fewer stored steps only if the log itself was damaged (a torn last line), and then
  the same prefix. With check_on_access=False a differing value must be followed by the error
  from check() before the run ends.
* fields (one JSON field of the manifest, a log line or a safetensors header replaced, deleted
  or added, with the checksums made consistent, so that only validation can refuse it): refused
  with the store's error (verify() may also refuse with ValueError), or loads with θ, the moments
  and the batch indices identical to the template's (an edited header: of its dtype and shape;
  a consistent header may point a tensor at other bytes of the file) and every scalar
  well-typed; an added unknown key loads to identical numbers; a file name set to a path (``../outside/…``, absolute, ``./…``, ``…/``) of
  an identical copy of the right file — which a reader that followed it would load to identical
  numbers — is refused.
* files  (deleted, swapped, duplicated, replaced by another trajectory's file, a directory, a
  FIFO or a hard link; unrelated files added): refused, or identical numbers.
* links  (a symlink at any name, to an outside copy of the right file, to another file inside,
  dangling, /dev/null or a FIFO outside): refused whenever the store reads that name; identical
  numbers otherwise.

Deterministic (derandomized) and bounded for CI: EXPLAIND_FUZZ_EXAMPLES examples per category
(default 60; about 15 s for the four categories on one core); EXPLAIND_FUZZ_RANDOM=1 draws new
examples each run.
"""
import json
import math
import os
import shutil
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from explaind_fast.recording import TrajectoryRecorder  # noqa: E402
from explaind_fast.store import LOG, MANIFEST, CorruptTrajectoryError, Trajectory, \
    encode_log_line, manifest_checksum, step_file_name  # noqa: E402
from explaind_fast.testing.models import N_SAMPLES, small_data, small_model  # noqa: E402
from explaind_fast.testing.runs import small_optimizer  # noqa: E402
from store_tamper import Hang, no_hang, put_file, read_entries, safetensors_bytes, \
    same_value  # noqa: E402

EXAMPLES = int(os.environ.get("EXPLAIND_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("EXPLAIND_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck))
INIT = "theta_0.safetensors"


# ------------------------------------------------------------------------------ templates
def _record_adamw(d):
    """AdamW float64, 3 stored updates: per-sample weights at step 1, lr = 0 for group 1 at step 2
    (the first moment is stored then)."""
    X, Y = small_data(torch.float64)
    model = small_model(torch.float64)
    opt = small_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False) as rec:
        for s in range(3):
            idx = torch.arange(5 * s, 5 * s + 6)
            w = torch.linspace(0.1, 0.3, 6, dtype=torch.float64) if s == 1 else None
            rec.set_batch(idx, w)
            opt.param_groups[1]["lr"] = 0.0 if s == 2 else 0.01
            opt.zero_grad()
            losses = F.cross_entropy(model(X[idx]), Y[idx], reduction="none")
            (losses * (w if w is not None else 1 / 6)).sum().backward()
            opt.step()


def _record_sgd(d):
    """SGD float32, checkpoint_every=2, 3 raw steps: stored updates of 2 and 1 raw steps."""
    X, Y = small_data(torch.float32)
    model = small_model(torch.float32)
    opt = small_optimizer(model, "sgd")
    with TrajectoryRecorder(model, opt, d, 2, dataset_size=N_SAMPLES, fsync=False) as rec:
        for s in range(3):
            idx = torch.arange(3 * s, 3 * s + 4)
            w = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64) if s == 0 else None
            rec.set_batch(idx, w)
            opt.zero_grad()
            losses = F.cross_entropy(model(X[idx]), Y[idx], reduction="none")
            (losses * (w.float() if w is not None else 0.25)).sum().backward()
            opt.step()


TEMPLATES = {"adamw": _record_adamw, "sgd-k2": _record_sgd}


def canonical_names(d):
    n = len(read_entries(d))
    return [MANIFEST, LOG, INIT] + [step_file_name(s) for s in range(n)]


# ------------------------------------------------------------------------------ reading it all
def _record(r):
    return {k: getattr(r, k) for k in ("index", "step_count", "lr", "weight_decay", "clip_factor",
                                       "batch_indices", "batch_weights", "exp_avg_sq", "exp_avg")}


def read_everything(d, check_on_access=True):
    """(list of (label, value) read, the exception that ended it or None, its stage)."""
    got, stage = [], "load"
    try:
        with no_hang(20):
            t = Trajectory.load(d, check_on_access=check_on_access)
            try:
                stage = "read"
                got.append(("num_steps", t.num_steps))
                for s in range(t.num_steps + 1):
                    got.append((("theta", s), t.theta(s)))
                for s in range(t.num_steps):
                    got.append((("step", s), _record(t.step(s))))
                    got.append((("raw", s), [_record(r) for r in t.raw_steps(s)]))
                stage = "check"
                t.check()
                stage = "verify"
                rep = t.verify()
                got.append(("verify", (rep.mode, rep.theta_error, rep.moment_error,
                                       rep.step_size)))
            finally:
                t.close()
        return got, None, stage
    except Hang:
        raise
    except Exception as e:   # judged by the properties
        return got, e, stage


# ------------------------------------------------------------------------------ foreign reads
_OPENS = None


def _audit(event, args):
    if _OPENS is not None and event == "open":
        _OPENS.append(args)


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    sys.addaudithook(_audit)   # permanent, a no-op unless a fuzz example is reading
    base = tmp_path_factory.mktemp("fuzz")
    templates = {}
    for name, record in TEMPLATES.items():
        d = base / f"template-{name}"
        record(d)
        got, err, _ = read_everything(d)
        assert err is None, err
        templates[name] = (d, dict(got), canonical_names(d))
    return base, templates


def run_watched(d, outside, names, check_on_access=True):
    """read_everything, recording the files opened; asserts nothing foreign was opened (only the
    directory, and ``names``: the template's canonical names)."""
    global _OPENS
    _OPENS = []
    try:
        got, err, stage = read_everything(d, check_on_access)
    finally:
        opens, _OPENS = _OPENS, None
    root = os.path.realpath(d)
    allowed = set(names)
    for path, mode, flags in opens:
        if isinstance(path, int):
            continue
        p = os.fsdecode(path)
        if os.path.isabs(p):
            rp = os.path.realpath(p)
            assert not rp.startswith(os.path.realpath(outside)), f"opened outside: {p}"
            assert not p.startswith("/dev/"), f"opened a device: {p}"
            if os.path.realpath(os.path.dirname(p)) == root or rp == root:
                assert rp == root, f"opened {p} by path, not relative to the directory"
            continue   # Python's own files (lazy imports)
        assert p in allowed, f"opened a name the store does not use: {p!r}"
        if flags is not None and flags >= 0:
            assert flags & os.O_NOFOLLOW, f"opened {p!r} without O_NOFOLLOW"
            assert flags & os.O_ACCMODE == os.O_RDONLY, f"opened {p!r} for writing"
    return got, err, stage


def new_copy(fuzz_env, template):
    base, templates = fuzz_env
    root = tempfile.mkdtemp(dir=base)
    d = os.path.join(root, "t")
    shutil.copytree(templates[template][0], d)
    outside = os.path.join(root, "outside")
    os.mkdir(outside)
    return root, d, outside


# ------------------------------------------------------------------------------ properties
def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return same_value(a, b)


def assert_refused_or_identical(truth, got, err, stage, *, log_damaged, check_on_access=True,
                                manifest_deleted=False, why=""):
    if err is not None:
        ok = isinstance(err, CorruptTrajectoryError) or (
            manifest_deleted and isinstance(err, FileNotFoundError) and stage == "load")
        assert ok, f"{why}: not the store's error at {stage}: {type(err).__name__}: {err}"
    n = dict(got).get("num_steps", truth["num_steps"])
    if n != truth["num_steps"]:   # a torn log: its complete prefix; anything else: refused
        assert (log_damaged and n < truth["num_steps"]) \
            or isinstance(err, CorruptTrajectoryError), \
            f"{why}: {n} stored steps, not {truth['num_steps']}, and no error"
    differs = []
    for label, value in got:
        if label == "num_steps":
            continue
        if label == "verify":
            want = tuple(x[:n] for x in truth["verify"])
            if not _same(tuple(value), want):
                differs.append(label)
        elif label not in truth or not _same(value, truth[label]):
            differs.append(label)
    if differs:
        assert not check_on_access and isinstance(err, CorruptTrajectoryError), \
            f"{why}: wrong numbers for {differs} (error: {err!r})"


# ------------------------------------------------------------------------------ bytes
@st.composite
def byte_corruption(draw, size, is_log):
    ops = ["flip", "set", "truncate", "insert", "delete", "append", "replace"]
    if is_log:
        ops += ["drop_line", "dup_line", "swap_lines", "newline"]
    op = draw(st.sampled_from(ops))
    pos = draw(st.integers(0, max(size - 1, 0)))
    if op == "flip":
        return op, pos, draw(st.integers(0, 7))
    if op == "set":
        return op, pos, draw(st.integers(0, 255))
    if op == "truncate":
        return op, draw(st.integers(0, max(size - 1, 0))), None
    if op in ("insert", "append"):
        return op, pos, draw(st.binary(min_size=1, max_size=24))
    if op == "delete":
        return op, pos, draw(st.integers(1, 64))
    if op == "replace":
        return op, 0, draw(st.binary(max_size=300))
    return op, draw(st.integers(0, 50)), draw(st.integers(0, 50))


def apply_bytes(path, op, a, b):
    raw = bytearray(open(path, "rb").read())
    if op == "flip" and raw:
        raw[a % len(raw)] ^= 1 << b
    elif op == "set" and raw:
        raw[a % len(raw)] = b
    elif op == "truncate":
        del raw[a:]
    elif op == "insert":
        raw[a:a] = b
    elif op == "delete":
        del raw[a:a + b]
    elif op == "append":
        raw += b
    elif op == "replace":
        raw = bytearray(b)
    elif op == "newline":
        nls = [i for i, c in enumerate(raw) if c == 10]
        if nls:
            raw[nls[a % len(nls)]] = 32 + b % 90
    else:
        lines = bytes(raw).split(b"\n")[:-1]
        if lines:
            i, j = a % len(lines), b % len(lines)
            if op == "drop_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            raw = bytearray(b"".join(x + b"\n" for x in lines))
    with open(path, "wb") as f:
        f.write(raw)


@FUZZ
@given(data=st.data())
def test_fuzz_bytes(fuzz_env, data):
    template = data.draw(st.sampled_from(sorted(TEMPLATES)), "template")
    root, d, outside = new_copy(fuzz_env, template)
    try:
        truth, names = fuzz_env[1][template][1], fuzz_env[1][template][2]
        name = data.draw(st.sampled_from(names), "file")
        size = os.path.getsize(os.path.join(d, name))
        op, a, b = data.draw(byte_corruption(size, name == LOG), "corruption")
        apply_bytes(os.path.join(d, name), op, a, b)
        check_on_access = data.draw(st.booleans(), "check_on_access")
        got, err, stage = run_watched(d, outside, names, check_on_access)
        assert_refused_or_identical(truth, got, err, stage, log_damaged=name == LOG,
                                    check_on_access=check_on_access,
                                    why=f"{template}: {op}({a}, {b!r:.40}) of {name}")
    finally:
        shutil.rmtree(root)


# ------------------------------------------------------------------------------ fields
EVIL_STRINGS = ["../outside/theta_0.safetensors", "/dev/zero", "/etc/passwd", "theta_0.safetensors",
                "step_00000001.safetensors", "step_1.safetensors", "", "NaN", "float64", "adamw",
                "sgd", "int64", "Tensor", "__class__", "x" * 300]
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.sampled_from([0, 1, -1, 2, 3, 6, 24, 67, 2**31, 2**63])
                | st.floats(allow_nan=True, allow_infinity=True)
                | st.sampled_from([0.0, -0.0, 1e-300, 0.5, 1.0, 1.5, -1.0, math.nan, math.inf])
                | st.sampled_from(EVIL_STRINGS) | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, prefix + (i,))


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


@st.composite
def field_edit(draw, obj):
    paths = [p for p in json_paths(obj) if p]
    op = draw(st.sampled_from(["replace", "replace", "perturb", "delete", "add_unknown"]))
    if op == "add_unknown":
        containers = [p for p in json_paths(obj) if isinstance(_get(obj, p), dict)]
        return op, draw(st.sampled_from(containers)), draw(JSON_VALUES)
    path = draw(st.sampled_from(paths))
    if op == "perturb":
        v = _get(obj, path)
        if type(v) in (int, float):
            f = draw(st.sampled_from([lambda x: -x, lambda x: x + 1, lambda x: x * (1 + 2**-40),
                                      lambda x: x * 2, lambda x: float(x), lambda x: math.nan,
                                      lambda x: math.inf, lambda x: 0]))
            return "replace", path, f(v)
        op = "replace"
    if op == "replace":
        return op, path, draw(JSON_VALUES)
    return op, path, None


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def apply_field(obj, op, path, value):
    if op == "add_unknown":
        _get(obj, path)["x_unknown_field"] = value
    elif op == "replace":
        _parent(obj, path)[path[-1]] = value
    else:
        del _parent(obj, path)[path[-1]]


def _like(a, b):
    return a.dtype == b.dtype and a.shape == b.shape


def check_well_typed(truth, got, n_groups, tensors_identical=True):
    """What a trajectory with edited fields may return: θ, moments and indices identical to the
    template's (with an edited safetensors header: of the template's dtype and shape); scalars of
    the right types."""
    same = same_value if tensors_identical else _like
    for label, value in got:
        kind = label[0] if isinstance(label, tuple) else label
        if kind == "theta":
            assert same(value, truth[label]), f"θ_{label[1]} differs"
        elif kind in ("step", "raw"):
            want = truth.get(label)
            recs = value if kind == "raw" else [value]
            wants = (want if kind == "raw" else [want]) if want is not None else [None] * len(recs)
            for r, w in zip(recs, wants):
                for key in ("exp_avg_sq", "exp_avg", "batch_indices"):
                    if r[key] is not None:
                        assert w is not None and w[key] is not None and same(r[key], w[key]), \
                            f"{label}: {key}"
                if r["batch_weights"] is not None:
                    bw = r["batch_weights"]
                    assert bw.dtype == torch.float64 and bw.shape == r["batch_indices"].shape
                    assert bool(torch.isfinite(bw).all())
                assert type(r["step_count"]) is int and r["step_count"] >= 1
                assert type(r["index"]) is int and r["index"] >= 0
                assert type(r["clip_factor"]) is float and math.isfinite(r["clip_factor"])
                for key in ("lr", "weight_decay"):
                    assert len(r[key]) == n_groups and all(type(x) is float for x in r[key])


@FUZZ
@given(data=st.data())
def test_fuzz_fields(fuzz_env, data):
    template = data.draw(st.sampled_from(sorted(TEMPLATES)), "template")
    root, d, outside = new_copy(fuzz_env, template)
    try:
        truth, names = fuzz_env[1][template][1], fuzz_env[1][template][2]
        target = data.draw(st.sampled_from(["manifest", "log", "header"]), "target")
        rename = target != "header" and data.draw(st.integers(0, 5), "rename?") == 0
        if rename:   # the file name field: a path to an identical copy of the right file
            right = INIT if target == "manifest" else step_file_name(
                data.draw(st.integers(0, len(names) - 4), "line"))
            shutil.copy(os.path.join(d, right), os.path.join(outside, right))
            os.mkdir(os.path.join(outside, "sub"))
            shutil.copy(os.path.join(d, right), os.path.join(outside, "sub", right))
            value = data.draw(st.sampled_from([
                f"../outside/{right}", os.path.join(outside, right), f"./{right}", f"{right}/",
                f"../{os.path.basename(d)}/{right}", f"../outside/sub/../{right}",
                f"sub/{right}", "/dev/null", right.upper()]), "name")
        if target == "manifest":
            m = json.load(open(os.path.join(d, MANIFEST)))
            if rename:
                op, path = "rename", ("init", "file")
            else:
                op, path, value = data.draw(field_edit(m), "edit")
            apply_field(m, "replace" if rename else op, path, value)
            if path != ("sha256",):
                m["sha256"] = manifest_checksum(m)
            with open(os.path.join(d, MANIFEST), "w") as f:
                f.write(json.dumps(m, indent=1) + "\n")
        elif target == "header":   # the JSON header of a tensor file (its sha256 recorded anew)
            name = data.draw(st.sampled_from([n for n in names if n.endswith(".safetensors")]),
                             "file")
            raw = open(os.path.join(d, name), "rb").read()
            hl = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + hl])
            op, path, value = data.draw(field_edit(header), "edit")
            apply_field(header, op, path, value)
            put_file(d, None if name == INIT else int(name[5:13]),
                     safetensors_bytes(header, raw[8 + hl:]))
        else:
            entries = read_entries(d)
            if rename:
                op, path = "rename", ("file",)
                s = int(right[5:13])
            else:
                s = data.draw(st.integers(0, len(entries) - 1), "line")
                op, path, value = data.draw(field_edit(entries[s]), "edit")
            apply_field(entries[s], "replace" if rename else op, path, value)
            with open(os.path.join(d, LOG), "w", encoding="utf-8") as f:
                f.write("".join(encode_log_line(e) for e in entries))
        got, err, stage = run_watched(d, outside, names)
        why = f"{template}: {op} {target} {path} = {value!r:.60}"
        if op == "rename":        # a name that is a path, to an identical copy: refused
            assert isinstance(err, CorruptTrajectoryError) and "field" in str(err), \
                f"{why}: not refused: {err!r}"
            return
        if op == "add_unknown":
            # optional fields of later versions: tolerated, same numbers (a header is
            # safetensors': its entries and metadata have fixed types, so it may refuse)
            assert err is None or target == "header", f"{why}: refused: {err!r}"
            assert_refused_or_identical(truth, got, err, stage, log_damaged=False, why=why)
            return
        if err is not None:
            assert isinstance(err, CorruptTrajectoryError) or (
                stage == "verify" and isinstance(err, ValueError)), \
                f"{why}: not the store's error at {stage}: {type(err).__name__}: {err}"
        n_groups = len(json.load(open(os.path.join(fuzz_env[1][template][0], MANIFEST)))
                       ["optimizer"]["hyper"])
        check_well_typed(truth, got, n_groups, tensors_identical=target != "header")
    finally:
        shutil.rmtree(root)


# ------------------------------------------------------------------------------ files
@FUZZ
@given(data=st.data())
def test_fuzz_files(fuzz_env, data):
    template = data.draw(st.sampled_from(sorted(TEMPLATES)), "template")
    root, d, outside = new_copy(fuzz_env, template)
    try:
        truth, names = fuzz_env[1][template][1], fuzz_env[1][template][2]
        other = fuzz_env[1][[t for t in TEMPLATES if t != template][0]][0]
        op = data.draw(st.sampled_from(["delete", "swap", "duplicate", "foreign", "directory",
                                        "fifo", "hardlink", "extra"]), "op")
        name = data.draw(st.sampled_from(names), "file")
        name2 = data.draw(st.sampled_from([n for n in names if n.endswith(".safetensors")]),
                          "other file")
        p = os.path.join(d, name)
        if op == "delete":
            os.remove(p)
        elif op in ("swap", "duplicate") and name != name2 and name.endswith(".safetensors"):
            p2 = os.path.join(d, name2)
            if op == "swap":
                os.rename(p, p + ".x")
                os.rename(p2, p)
                os.rename(p + ".x", p2)
            else:
                shutil.copy(p2, p)
        elif op == "foreign" and os.path.exists(os.path.join(other, name)):
            shutil.copy(os.path.join(other, name), p)
        elif op == "directory":
            os.remove(p)
            os.mkdir(p)
        elif op == "fifo":
            os.remove(p)
            os.mkfifo(p)
        elif op == "hardlink":       # the entry is still a regular file in the directory
            os.rename(p, os.path.join(outside, name))
            os.link(os.path.join(outside, name), p)
        elif op == "extra":
            extra = data.draw(st.sampled_from([
                step_file_name(len(names) - 3), step_file_name(60), INIT + ".tmp",
                MANIFEST + ".tmp", step_file_name(0) + ".tmp", "notes.txt", ".hidden",
                "writer.lock", "step_00000001.safetensors.bak"]), "extra")
            shutil.copy(os.path.join(d, name2), os.path.join(d, extra))
        check_on_access = data.draw(st.booleans(), "check_on_access")
        got, err, stage = run_watched(d, outside, names, check_on_access)
        assert_refused_or_identical(truth, got, err, stage, log_damaged=name == LOG,
                                    check_on_access=check_on_access,
                                    manifest_deleted=name == MANIFEST,
                                    why=f"{template}: {op} {name} {name2}")
    finally:
        shutil.rmtree(root)


# ------------------------------------------------------------------------------ links
@FUZZ
@given(data=st.data())
def test_fuzz_links(fuzz_env, data):
    template = data.draw(st.sampled_from(sorted(TEMPLATES)), "template")
    root, d, outside = new_copy(fuzz_env, template)
    try:
        truth, names = fuzz_env[1][template][1], fuzz_env[1][template][2]
        name = data.draw(st.sampled_from(names + ["notes.txt", step_file_name(len(names) - 3),
                                                  INIT + ".tmp"]), "link name")
        target = data.draw(st.sampled_from(["copy", "inside", "dangling", "/dev/null", "fifo",
                                            "outside-dir"]), "target")
        p = os.path.join(d, name)
        if target == "copy":
            dest = os.path.join(outside, "copy")
            shutil.copy(p if os.path.exists(p) else os.path.join(d, INIT), dest)
        elif target == "inside":
            dest = os.path.join(d, data.draw(st.sampled_from(names), "inside target"))
        elif target == "dangling":
            dest = os.path.join(outside, "nothing")
        elif target == "fifo":
            dest = os.path.join(outside, "fifo")
            os.mkfifo(dest)
        elif target == "outside-dir":
            dest = outside
        else:
            dest = target
        if os.path.lexists(p):
            os.remove(p)
        os.symlink(dest, p)
        got, err, stage = run_watched(d, outside, names)
        why = f"{template}: {name} -> {target}"
        if name in names:   # every name the store reads: the link is refused, never followed
            assert isinstance(err, CorruptTrajectoryError) and "symbolic link" in str(err), \
                f"{why}: not refused: {err!r}"
        assert_refused_or_identical(truth, got, err, stage, log_damaged=name == LOG, why=why)
    finally:
        shutil.rmtree(root)
