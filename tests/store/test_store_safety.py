"""Store safety: a trajectory directory can never make the library read, write or block outside
it, or load a wrong number. Links, FIFOs, devices and directories at the store's names; names in
the log and manifest that are paths; malformed fields (with valid checksums, so only validation
can catch them); tensors of the wrong dtype, shape or range; NaN / negative moments and rates in
verify(); the writer facing planted links. The lock is tested in tests/recording."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import LOCK_FILE, LOG, MANIFEST, CorruptTrajectoryError, Trajectory, \
    VerifyReport, step_file_name
from explaind_fast.testing.models import N_SAMPLES, small_data as data, small_model as make_model
from explaind_fast.testing.runs import record_run, small_optimizer as make_optimizer
from store_tamper import no_hang, put_file, read_entries, read_manifest, read_tensors, \
    rewrite_tensors, safetensors_bytes, same_value, snapshot, write_entries, write_manifest

F64 = torch.float64
INIT = "theta_0.safetensors"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """AdamW, float64, 6 stored updates of mini-batches (uniform weights), dataset_size 24."""
    d = tmp_path_factory.mktemp("template") / "t"
    record_run(d, "adamw", F64, fsync=False)
    with Trajectory.load(d) as t:
        return d, snapshot(t)


@pytest.fixture
def traj_dir(template, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(template[0], d)
    return d


@pytest.fixture
def outside(tmp_path):
    """A directory next to the trajectory: nothing in it may ever be read or written."""
    o = tmp_path / "outside"
    o.mkdir()
    return o


def load_all(d, **kw):
    """Load and read everything (every θ, step, raw step; check; verify)."""
    with no_hang():
        t = Trajectory.load(d, **kw)
        snap = snapshot(t)
        t.check()
        t.verify()
        return snap


def refuses(d, match, **kw):
    with pytest.raises(CorruptTrajectoryError, match=match):
        load_all(d, **kw)


# ------------------------------------------------------------------------------ links and types
@pytest.mark.parametrize("name", [MANIFEST, LOG, INIT, step_file_name(2)])
@pytest.mark.parametrize("target", ["copy", "dangling", "inside", "devnull"])
def test_links_are_never_followed(traj_dir, outside, name, target):
    """A symlink at any name the reader opens is refused, even to an identical copy of the file
    (a reader that followed it would read outside the directory)."""
    real = traj_dir / name
    if target == "copy":
        dest = outside / name
        shutil.copy(real, dest)
    elif target == "dangling":
        dest = outside / "nothing"
    elif target == "inside":
        dest = traj_dir / (step_file_name(3) if name != step_file_name(3) else INIT)
    else:
        dest = "/dev/null"
    os.remove(real)
    os.symlink(dest, real)
    refuses(traj_dir, rf"{name}.*symbolic link")


@pytest.mark.parametrize("name", [MANIFEST, LOG, INIT, step_file_name(2)])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_fifos_and_directories_are_refused_without_blocking(traj_dir, name, kind):
    real = traj_dir / name
    os.remove(real)
    if kind == "fifo":
        os.mkfifo(real)     # opening it for reading would block forever without a writer
    else:
        real.mkdir()
    refuses(traj_dir, rf"{name}.*{'a FIFO' if kind == 'fifo' else 'a directory'}")


DEVICE_SCRIPT = r"""
import os, resource, sys
from explaind_fast.store import Trajectory, CorruptTrajectoryError
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
limit = vm + (1 << 30) if hard == resource.RLIM_INFINITY else min(vm + (1 << 30), hard)
resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
for d in sys.argv[1:]:
    try:
        t = Trajectory.load(d)
        t.check()
        print("LOADED", d)
    except CorruptTrajectoryError as e:
        print("REFUSED", d, str(e)[:200])
"""


def test_device_files_are_refused_without_reading(template, tmp_path):
    """/dev/zero at the manifest, the log or a step file (the old reader read it until memory ran
    out): refused without reading. Run in a subprocess with a 1 GiB address-space margin and a
    timeout, so that a regression fails fast instead of taking the machine down."""
    dirs = []
    for name in (MANIFEST, LOG, step_file_name(1)):
        for dev in ("/dev/zero", "/dev/urandom"):
            d = tmp_path / f"{name}-{os.path.basename(dev)}"
            shutil.copytree(template[0], d)
            os.remove(d / name)
            os.symlink(dev, d / name)
            dirs.append(str(d))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, *dirs], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == len(dirs) and all(
        line.startswith("REFUSED") and "symbolic link" in line for line in lines), out.stdout


def test_unrelated_entries_are_ignored(traj_dir, outside, template):
    """Entries with names the store does not use (links included) are never opened."""
    os.symlink("/dev/zero", traj_dir / "notes.txt")
    os.mkfifo(traj_dir / "fifo")
    (traj_dir / "sub").mkdir()
    os.symlink(outside, traj_dir / "step_1.safetensors")    # not a canonical name
    (traj_dir / (step_file_name(9) + ".tmp")).write_bytes(b"debris")
    assert same_value(load_all(traj_dir), template[1])


# ------------------------------------------------------------------------------ names and sizes
@pytest.mark.parametrize("name", ["../outside/step_00000001.safetensors", "/dev/zero",
                                  step_file_name(3), "step_1.safetensors", "",
                                  "step_00000001.safetensors/.", "./step_00000001.safetensors"])
def test_log_file_names_are_not_paths(traj_dir, outside, name):
    shutil.copy(traj_dir / step_file_name(1), outside / step_file_name(1))
    entries = read_entries(traj_dir)
    entries[1]["file"] = name
    write_entries(traj_dir, entries)
    refuses(traj_dir, r"steps\.jsonl: line 2 \(stored step 1\): field 'file': expected "
                      r"'step_00000001\.safetensors'")


@pytest.mark.parametrize("name", ["../outside/theta_0.safetensors", "/etc/passwd",
                                  step_file_name(0), 7])
def test_manifest_file_name_is_not_a_path(traj_dir, name):
    m = read_manifest(traj_dir)
    m["init"]["file"] = name
    write_manifest(traj_dir, m)
    refuses(traj_dir, r"manifest\.json: field 'init\.file': expected 'theta_0\.safetensors'")


def test_sizes_are_bounded(traj_dir):
    # a sparse 65 MiB manifest is refused by its size, without being read
    with open(traj_dir / MANIFEST, "r+b") as f:
        f.truncate(65 << 20)
    refuses(traj_dir, "more than a manifest may have")


def test_log_line_length_is_bounded(traj_dir, monkeypatch):
    import explaind_fast.store.reader as reader
    monkeypatch.setattr(reader, "MAX_LOG_LINE_BYTES", 200)
    refuses(traj_dir, "log line 1 .stored step 0. is longer than 200 bytes")


def test_deeply_nested_json_is_the_stores_error(traj_dir):
    (traj_dir / MANIFEST).write_text("[" * 200000 + "]" * 200000)
    refuses(traj_dir, r"manifest\.json: not valid JSON \(RecursionError")


def test_tensor_file_must_have_its_recorded_size(traj_dir):
    with open(traj_dir / step_file_name(3), "ab") as f:
        f.write(b"\0" * 8)
    refuses(traj_dir, r"step_00000003.*stored step 3.*1408 bytes, the log records 1400",
            check_on_access=False)


@pytest.mark.parametrize("header_len", [2**63, 1 << 30, 1400])
def test_safetensors_header_length_is_bounded(traj_dir, header_len):
    raw = bytearray((traj_dir / step_file_name(2)).read_bytes())
    raw[:8] = header_len.to_bytes(8, "little")
    put_file(traj_dir, 2, bytes(raw))
    refuses(traj_dir, r"step_00000002.*header length \d+ exceeds the file")


# ------------------------------------------------------------------------------ malformed lines
LINE_EDITS = [  # (edit of entry 2's JSON, the field named, what is said)
    (lambda e: e["raw"][0].update(lr="0.1"), r"raw\[0\]\.lr", "expected a list"),
    (lambda e: e["raw"][0].update(lr=[0.1]), r"raw\[0\]\.weight_decay", "expected 1 entries"),
    (lambda e: e["raw"][0].update(lr=[0.1], weight_decay=[0.0]), r"raw\[0\]\.lr",
     r"expected 2 entries \(one per param group\)"),
    (lambda e: e["raw"][0].update(lr=[0.1, None]), r"raw\[0\]\.lr\[1\]", "expected a number"),
    (lambda e: e["raw"][0].pop("weight_decay"), r"raw\[0\]\.weight_decay", "missing"),
    (lambda e: e["raw"][0].update(step_count=3.0), r"raw\[0\]\.step_count", "expected an integer"),
    (lambda e: e["raw"][0].update(batch_size=True), r"raw\[0\]\.batch_size", "expected an integer"),
    (lambda e: e["raw"][0].update(batch_size=0), r"raw\[0\]\.batch_size", r"in \[1, "),
    (lambda e: e["raw"][0].update(index=7), r"raw\[0\]\.index", r"in \[2, 2\]"),
    (lambda e: e["raw"][0].update(clip_factor=float("nan")), r"raw\[0\]\.clip_factor", "finite"),
    (lambda e: e["raw"][0].update(clip_factor="1"), r"raw\[0\]\.clip_factor", "expected a number"),
    (lambda e: e["raw"][0].update(uniform_weight=float("inf")), r"raw\[0\]\.uniform_weight",
     "finite"),
    (lambda e: e.update(raw=[]), "raw", "at least 1"),
    (lambda e: e.update(raw={"0": 1}), "raw", "expected a list"),
    (lambda e: e.update(raw=[5]), r"raw\[0\]", "expected an object"),
    (lambda e: e.update(raw=e["raw"] * 2), r"raw\[1\]\.index", r"in \[3, 3\]"),
    (lambda e: e.update(sha256="abc"), "sha256", "64 lowercase hex"),
    (lambda e: e.update(sha256=e["sha256"].upper()), "sha256", "64 lowercase hex"),
    (lambda e: e.update(bytes=-1), "bytes", "expected an integer in"),
    (lambda e: e.update(bytes=2.5), "bytes", "expected an integer"),
    (lambda e: e.update(bytes=10**400), "bytes", "expected an integer in"),
    (lambda e: e.pop("sha256"), "sha256", "missing"),
    (lambda e: e.update(time="noon"), "time", "expected a number"),
]


@pytest.mark.parametrize("edit,field,what", LINE_EDITS)
def test_malformed_log_fields_name_file_line_and_field(traj_dir, edit, field, what):
    entries = read_entries(traj_dir)
    edit(entries[2])
    write_entries(traj_dir, entries)
    refuses(traj_dir, rf"steps\.jsonl: line 3 \(stored step 2\): field '{field}': .*{what}")


@pytest.mark.parametrize("text", ['[1, 2]', '"x"', 'null', '{"step": "2"}', '{"step": 2.0}',
                                  '{"step": true}', '{}'])
def test_log_lines_that_are_not_entries(traj_dir, text):
    """Valid crc, but not an object with the right step number: the store's error, not an
    AttributeError / KeyError (and a last such line is not an incomplete write either)."""
    entries = read_entries(traj_dir)
    for line in (2, 5):
        write_entries(traj_dir, entries, raw_lines={line: text})
        refuses(traj_dir, rf"log line {line + 1} .stored step {line}. is corrupted")


def test_raw_steps_beyond_checkpoint_every(traj_dir):
    entries = read_entries(traj_dir)
    extra = dict(entries[5]["raw"][0], index=6, step_count=7)
    entries[5]["raw"].append(extra)
    write_entries(traj_dir, entries)
    refuses(traj_dir, r"line 6 \(stored step 5\): field 'raw': 2 raw steps in one stored "
                      r"update, checkpoint_every is 1")


def test_unknown_fields_are_tolerated(traj_dir, template):
    """Optional fields added by a later version (log entries, raw steps, the manifest, tensors
    with new names) load to the same numbers."""
    entries = read_entries(traj_dir)
    for e in entries:
        e["buffers"] = {"bn.running_mean": [1, 2]}
        e["raw"][0]["conditions"] = {"dropout": None}
    write_entries(traj_dir, entries)
    m = read_manifest(traj_dir)
    m["buffers"] = ["bn.running_mean"]
    write_manifest(traj_dir, m)
    rewrite_tensors(traj_dir, 3, lambda t: t.update({"buffer.bn.running_mean": torch.ones(4)}))
    assert same_value(load_all(traj_dir), template[1])


MANIFEST_EDITS = [
    (lambda m: m.update(layout=[1]), "layout", "expected an object"),
    (lambda m: m["layout"].update(names="fc1"), r"layout\.names", "expected a list"),
    (lambda m: m["layout"]["names"].__setitem__(1, 5), r"layout\.names\[1\]", "expected a string"),
    (lambda m: m["layout"]["names"].__setitem__(1, "embed.weight"), r"layout\.names", "unique"),
    (lambda m: m["layout"]["shapes"][0].__setitem__(0, -4), r"layout\.shapes\[0\]\[0\]",
     "expected an integer in"),
    (lambda m: m["layout"]["shapes"].pop(), r"layout\.shapes", "expected 5 entries"),
    (lambda m: m["layout"]["shapes"][0].__setitem__(0, 2**41), r"layout\.shapes\[0\]\[0\]", "in"),
    (lambda m: m["layout"]["group_of_tensor"].__setitem__(0, 2), r"layout\.group_of_tensor\[0\]",
     r"in \[0, 1\]"),
    (lambda m: m["layout"]["dtypes"].__setitem__(0, "int64"), r"layout\.dtypes\[0\]", "one of"),
    (lambda m: m.update(dtype="Tensor"), "dtype", "expected one of"),
    (lambda m: m.update(dtype="float32"), "dtype", "not the widest parameter dtype"),
    (lambda m: m["optimizer"].update(kind="rmsprop"), r"optimizer\.kind", "unknown optimizer"),
    (lambda m: m["optimizer"].update(hyper=[]), r"optimizer\.hyper", "at least 1"),
    (lambda m: m["optimizer"]["hyper"][0].update(betas=[0.9, 1.0]),
     r"optimizer\.hyper\[0\]\.betas\[1\]", "< 1.0"),
    (lambda m: m["optimizer"]["hyper"][1].update(eps=-1e-8), r"optimizer\.hyper\[1\]\.eps",
     ">= 0.0"),
    (lambda m: m["optimizer"]["hyper"][1].pop("eps"), r"optimizer\.hyper\[1\]\.eps", "missing"),
    (lambda m: m.update(checkpoint_every=0), "checkpoint_every", "expected an integer in"),
    (lambda m: m.update(checkpoint_every="1"), "checkpoint_every", "expected an integer"),
    (lambda m: m.update(dataset_size=-3), "dataset_size", "expected an integer in"),
    (lambda m: m.update(store_first_moment="no"), "store_first_moment", "true or false"),
    (lambda m: m["init"].update(bytes="696"), r"init\.bytes", "expected an integer"),
    (lambda m: m["init"].update(sha256=None), r"init\.sha256", "64 lowercase hex"),
    (lambda m: m.pop("init"), "init", "missing"),
]


@pytest.mark.parametrize("edit,field,what", MANIFEST_EDITS)
def test_malformed_manifest_fields_name_the_field(traj_dir, edit, field, what):
    m = read_manifest(traj_dir)
    edit(m)
    write_manifest(traj_dir, m)
    refuses(traj_dir, rf"manifest\.json: field '{field}': .*{what}")


def test_deeply_nested_field_gives_a_short_message(traj_dir):
    m = read_manifest(traj_dir)
    deep = 0
    for _ in range(500):
        deep = [deep]
    m["layout"] = deep
    write_manifest(traj_dir, m)
    with pytest.raises(CorruptTrajectoryError) as e:
        load_all(traj_dir)
    assert re.search(r"field 'layout': expected an object, got list \[\[\[\[?\.\.\.", str(e.value)) \
        and len(str(e.value)) < 300, str(e.value)


@pytest.mark.parametrize("m", [[1, 2], "x", None, {"format": "explaind_fast.trajectory",
                                                   "format_version": True}])
def test_manifest_that_is_not_a_manifest(traj_dir, m):
    write_manifest(traj_dir, m, fix_checksum=False)
    refuses(traj_dir, r"manifest\.json: (expected an object|.*format version True)")


def test_sgd_manifest_fields(tmp_path):
    d = tmp_path / "t"
    record_run(d, "sgd", F64, epochs=1, fsync=False)
    for edit, field in [(lambda h: h.update(dampening=0.1), "dampening"),
                        (lambda h: h.update(nesterov=True), "nesterov"),
                        (lambda h: h.update(momentum=-0.5), "momentum")]:
        m = read_manifest(d)
        keep = json.loads(json.dumps(m))
        edit(m["optimizer"]["hyper"][0])
        write_manifest(d, m)
        refuses(d, rf"field 'optimizer\.hyper\[0\]\.{field}'")
        write_manifest(d, keep)


# ------------------------------------------------------------------------------ tensors
def _set(name, value):
    return lambda t: t.update({name: value})


D = 67    # SmallMLP: 4·4 + 6·4 + 6 + 3·6 + 3
TENSOR_EDITS = [   # (stored step or None, edit of its tensors, what the error says)
    (2, lambda t: t.update(theta=t["theta"].float()), r"'theta': expected F64 of shape \[67\], "
                                                      r"got F32 of shape \[67\]"),
    (2, lambda t: t.update(theta=t["theta"][:-1]), r"'theta': expected F64 of shape \[67\]"),
    (2, lambda t: t.update(theta=t["theta"].reshape(1, D)), r"got F64 of shape \[1, 67\]"),
    (None, lambda t: t.update(theta=t["theta"].to(torch.bfloat16)), "'theta': expected F64"),
    (2, lambda t: t.update(exp_avg_sq=t["exp_avg_sq"][:5]), "'exp_avg_sq': expected F64"),
    (2, lambda t: t.pop("exp_avg_sq"), "'exp_avg_sq': missing"),
    (2, lambda t: t.pop("theta"), "'theta': missing"),
    (2, lambda t: t.update({"batch_indices.0": t["batch_indices.0"].double()}),
     r"'batch_indices\.0': expected I32 or I64 of shape \[8\], got F64"),
    (2, lambda t: t.update({"batch_indices.0": t["batch_indices.0"][:7]}),
     r"'batch_indices\.0': expected I32 or I64 of shape \[8\], got I32 of shape \[7\]"),
    (2, lambda t: t.update({"batch_indices.0": torch.arange(16, 24, dtype=torch.int16)}),
     r"'batch_indices\.0': expected I32 or I64"),
    (2, lambda t: t.update({"batch_indices.0": torch.arange(17, 25)}),
     r"'batch_indices\.0': index 24 is outside the dataset \[0, 24\)"),
    (2, lambda t: t.update({"batch_indices.0": torch.tensor([0, 1, 2, -1, 4, 5, 6, 7])}),
     r"'batch_indices\.0': index -1 is outside"),
    (2, lambda t: t.pop("batch_indices.0"), r"'batch_indices\.0': missing"),
    (2, lambda t: t.update({"batch_indices.1": t["batch_indices.0"].clone()}),
     r"'batch_indices\.1': not expected"),
    (2, lambda t: t.update({"batch_weights.0": torch.full((8,), 0.125, dtype=F64)}),
     r"'batch_weights\.0': not expected"),
    (2, lambda t: t.update(exp_avg_sq=t["exp_avg_sq"].unsqueeze(0).expand(2, -1)),
     "'exp_avg_sq': expected F64 of shape"),
    (None, lambda t: t.update(exp_avg=t["theta"].clone()), "'exp_avg': not expected"),
]


@pytest.mark.parametrize("s,edit,what", TENSOR_EDITS)
def test_tensor_dtypes_shapes_and_ranges(traj_dir, s, edit, what):
    """Checksums made consistent: only the checks against the manifest and the log catch these
    (before, several of them passed verify())."""
    rewrite_tensors(traj_dir, s, edit)
    refuses(traj_dir, what)


def test_weights_are_float64_finite_and_one_per_index(traj_dir):
    entries = read_entries(traj_dir)
    entries[1]["raw"][0]["uniform_weight"] = None
    write_entries(traj_dir, entries)
    for w, what in [(None, r"'batch_weights\.0': missing"),
                    (torch.full((8,), 0.125), r"expected F64 of shape \[8\], got F32"),
                    (torch.full((9,), 0.125, dtype=F64), r"expected F64 of shape \[8\]"),
                    (torch.tensor([0.1] * 7 + [math.nan], dtype=F64), "non-finite weights")]:
        rewrite_tensors(traj_dir, 1, (lambda t: t.pop("batch_weights.0", None)) if w is None
                        else _set("batch_weights.0", w))
        refuses(traj_dir, what)
    rewrite_tensors(traj_dir, 1, _set("batch_weights.0", torch.linspace(0.1, 0.2, 8, dtype=F64)))
    t = Trajectory.load(traj_dir)
    assert torch.equal(t.step(1).batch_weights, torch.linspace(0.1, 0.2, 8, dtype=F64))


@pytest.mark.parametrize("key,value", [("step", "3"), ("step", "init"), ("format", "other"),
                                       ("format_version", "2")])
def test_file_of_another_step_is_refused(traj_dir, key, value):
    """A step file moved to another step's name (with the log's sha adjusted) is refused by its
    metadata, even without checksums on access."""
    from explaind_fast.store.format import FORMAT_NAME
    tensors = read_tensors(traj_dir / step_file_name(2))
    meta = {"format": FORMAT_NAME, "format_version": "1", "step": "2", key: value}
    from safetensors.torch import save
    put_file(traj_dir, 2, save(tensors, metadata=meta))
    refuses(traj_dir, rf"step_00000002.*'__metadata__\.{key}': expected", check_on_access=False)


@pytest.mark.parametrize("header,what", [
    ({"theta": {"dtype": "F64", "shape": [67], "data_offsets": [0, 528]}}, "528 data bytes"),
    ({"theta": {"dtype": "F64", "shape": [66], "data_offsets": [8, 536]}}, "do not tile"),
    ({"theta": {"dtype": "F64", "shape": [67], "data_offsets": [0, 544]}}, r"in \[0, 536\]"),
    ({"theta": {"dtype": "X9", "shape": [67], "data_offsets": [0, 536]}}, "unknown safetensors"),
    ({"theta": {"dtype": ["F64"], "shape": [67], "data_offsets": [0, 536]}}, "unknown safetensors"),
    ({"theta": {"dtype": "F64", "shape": [-67], "data_offsets": [0, 536]}}, "shape"),
    ({"theta": {"dtype": "F64", "shape": [67], "data_offsets": [0, 536, 9]}}, "2 entries"),
    ({"theta": [1]}, "expected an object"),
    ({"__metadata__": {"step": 1}}, r"__metadata__\.step': expected a string"),
])
def test_malformed_safetensors_headers(traj_dir, header, what):
    data = read_tensors(traj_dir / INIT)["theta"].numpy().tobytes()
    put_file(traj_dir, None, safetensors_bytes(header, data))
    refuses(traj_dir, rf"theta_0\.safetensors \(θ_0\) safetensors header.*{what}",
            check_on_access=False)


# ------------------------------------------------------------------------------ verify()
@pytest.mark.parametrize("value", [math.nan, math.inf, -1e-12])
def test_verify_refuses_bad_second_moments(traj_dir, value):
    def edit(t):
        v = t["exp_avg_sq"].clone()
        v[20] = value
        t["exp_avg_sq"] = v
    rewrite_tensors(traj_dir, 3, edit)
    t = Trajectory.load(traj_dir)
    what = "negative" if value < 0 and math.isfinite(value) else "non-finite"
    with pytest.raises(ValueError, match=rf"stored step 3: exp_avg_sq \(v_4\) has a {what} entry "
                                         rf"\(.* at coordinate 20, parameter 'fc1.weight'\)"):
        t.verify()


@pytest.mark.parametrize("field", ["lr", "weight_decay"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01])
def test_verify_refuses_bad_rates(traj_dir, field, value):
    entries = read_entries(traj_dir)
    entries[4]["raw"][0][field][1] = value
    write_entries(traj_dir, entries)
    t = Trajectory.load(traj_dir)     # loads what was recorded ...
    got = getattr(t.step(4), field)[1]
    assert got == value or (math.isnan(value) and math.isnan(got))
    with pytest.raises(ValueError, match=rf"stored step 4, raw step 4: {field}\[1\] \(param group "
                                         rf"1\) is {value}; expected a finite number >= 0"):
        t.verify()                    # ... and verify refuses it


def test_verify_refuses_non_finite_theta(traj_dir):
    rewrite_tensors(traj_dir, None, lambda t: t["theta"].__setitem__(3, math.nan))
    with pytest.raises(ValueError, match=r"θ_0 has a non-finite entry \(nan at coordinate 3"):
        Trajectory.load(traj_dir).verify()


def test_verify_checks_the_first_step_count(traj_dir):
    entries = read_entries(traj_dir)
    for e in entries:
        e["raw"][0]["step_count"] += 1
    write_entries(traj_dir, entries)
    with pytest.raises(ValueError, match="raw step 0 has step count 2, expected 1"):
        Trajectory.load(traj_dir).verify()


def test_report_maxima_keep_nan():
    r = VerifyReport(mode=["derived-m"] * 3, theta_error=[1e-16, math.nan, 2e-16],
                     moment_error=[1e-13, 3e-13, math.nan], step_size=[1.0] * 3)
    assert math.isnan(r.max_theta_error) and math.isnan(r.max_moment_error)
    assert "nan" in str(r)
    r = VerifyReport(mode=["derived-m", "not-replayable"], theta_error=[1e-16, math.nan],
                     moment_error=[1e-13, math.nan], step_size=[1.0] * 2)
    assert r.max_theta_error == 1e-16 and r.max_moment_error == 1e-13
    r = VerifyReport(mode=["derived-m"], theta_error=[0.0], moment_error=[math.nan],
                     step_size=[1.0], second_moment=False)
    assert r.max_theta_error == 0.0 and math.isnan(r.max_moment_error)


# ------------------------------------------------------------------------------ the writer
def _victim(outside, name="victim"):
    p = outside / name
    p.write_bytes(b"precious\n")
    return p


def _record(d, steps, **kw):
    X, Y = data(F64)
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    rec = TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False, **kw)
    for s in range(steps):
        idx = torch.arange(8 * (s % 3), 8 * (s % 3) + 8)
        rec.set_batch(idx)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    return rec, model, opt


def _step(rec, model, opt, s=0):
    X, Y = data(F64)
    idx = torch.arange(8)
    rec.set_batch(idx)
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.step()


def test_creation_debris_links_are_replaced_not_followed(tmp_path, outside):
    d = tmp_path / "t"
    d.mkdir()
    victim = _victim(outside)
    for name in (INIT, INIT + ".tmp", MANIFEST + ".tmp"):
        os.symlink(victim, d / name)
    rec, model, opt = _record(d, 3)
    rec.close()
    assert victim.read_bytes() == b"precious\n" and os.listdir(outside) == ["victim"]
    assert not any(os.path.islink(d / n) for n in os.listdir(d))
    Trajectory.load(d).verify(model)


@pytest.mark.parametrize("target", ["victim", "dangling"])
def test_planted_tmp_links_mid_run_are_not_followed(tmp_path, outside, target):
    d = tmp_path / "t"
    victim = _victim(outside)
    rec, model, opt = _record(d, 2)
    dest = victim if target == "victim" else outside / "would-be-created"
    for s in (2, 3):
        os.symlink(dest, d / (step_file_name(s) + ".tmp"))
    _step(rec, model, opt)
    _step(rec, model, opt)
    rec.close()
    assert victim.read_bytes() == b"precious\n" and os.listdir(outside) == ["victim"]
    assert Trajectory.load(d).num_steps == 4


@pytest.mark.parametrize("how", ["symlink", "hardlink", "fifo"])
def test_log_that_is_not_our_file_is_never_appended_to(tmp_path, outside, how):
    d = tmp_path / "t"
    rec, model, opt = _record(d, 2)
    victim = outside / "victim"
    shutil.copy(d / LOG, victim)
    before = victim.read_bytes()
    os.remove(d / LOG)
    if how == "symlink":
        os.symlink(victim, d / LOG)
    elif how == "hardlink":
        os.link(victim, d / LOG)
    else:
        os.mkfifo(d / LOG)
    what = {"symlink": "a symbolic link", "hardlink": "2 hard links", "fifo": "a FIFO"}[how]
    with no_hang(), pytest.raises(RuntimeError, match=rf"refusing to write .*steps\.jsonl.*{what}"):
        _step(rec, model, opt)
    assert victim.read_bytes() == before
    rec.close()


def test_resume_removes_planted_links_without_following_them(tmp_path, outside):
    d = tmp_path / "t"
    victim = _victim(outside)
    rec, model, opt = _record(d, 3)
    rec.close()
    for name in (step_file_name(3) + ".tmp", step_file_name(4), INIT + ".tmp",
                 MANIFEST + ".tmp"):
        os.symlink(victim, d / name)
    os.symlink(victim, d / "mine.tmp")         # not the writer's: left alone
    with TrajectoryRecorder(model, opt, d, resume=True, fsync=False) as rec:
        assert sorted(n for n in os.listdir(d) if os.path.islink(d / n)) == ["mine.tmp"]
        _step(rec, model, opt)
    assert victim.read_bytes() == b"precious\n"
    assert Trajectory.load(d).num_steps == 4


def test_resume_refuses_a_linked_log_and_truncates_nothing(tmp_path, outside):
    d = tmp_path / "t"
    rec, model, opt = _record(d, 3)
    rec.close()
    victim = outside / "victim"
    shutil.copy(d / LOG, victim)
    with open(victim, "ab") as f:
        f.write(b"partial line that a resume would truncate")
    before = victim.read_bytes()
    os.remove(d / LOG)
    os.symlink(victim, d / LOG)
    with pytest.raises(CorruptTrajectoryError, match="symbolic link"):
        TrajectoryRecorder(model, opt, d, resume=True, fsync=False)
    assert victim.read_bytes() == before and not (d / LOCK_FILE).exists()


def test_directory_at_a_tmp_name_is_refused(tmp_path):
    d = tmp_path / "t"
    rec, model, opt = _record(d, 1)
    (d / (step_file_name(1) + ".tmp")).mkdir()
    with pytest.raises(RuntimeError, match=r"refusing to write .*step_00000001\.safetensors\.tmp"
                                           r".*a directory"):
        _step(rec, model, opt)
    rec.close()


@pytest.mark.parametrize("how", ["symlink", "hardlink", "fifo"])
def test_lock_file_that_is_not_ours_is_refused(tmp_path, outside, how):
    d = tmp_path / "t"
    d.mkdir()
    victim = _victim(outside)
    if how == "symlink":
        os.symlink(victim, d / LOCK_FILE)
    elif how == "hardlink":
        os.link(victim, d / LOCK_FILE)
    else:
        os.mkfifo(d / LOCK_FILE)
    model = make_model(F64)
    with no_hang(), pytest.raises(RuntimeError, match=r"refusing to write .*writer\.lock"):
        TrajectoryRecorder(model, make_optimizer(model, "adamw"), d)
    assert victim.read_bytes() == b"precious\n"
