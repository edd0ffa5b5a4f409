"""The benchmark harness every script in bench/ uses: timing, peak memory, resource usage, the
environment row and the one results folder. Dependency-free beyond torch and the standard library
(triton's version is read from its package metadata; triton is never imported here).

Timing
    :func:`time_call`   seconds of each of ``repeats`` calls after ``warmup`` calls. CPU (and CUDA
                        with ``sync=False``): ``time.perf_counter`` around the call. CUDA: a pair of
                        ``torch.cuda.Event(enable_timing=True)`` recorded around the call on the
                        current stream, after a ``torch.cuda.synchronize()``, read after a second
                        synchronize (the device time from the first launch to the end of the last
                        kernel, host gaps between launches included).
    :func:`summarize`   ``{"median_s", "p20_s", "p80_s", "n"}`` of a list of seconds, the same
                        definition for every script: ``statistics.median`` and
                        ``statistics.quantiles(times, n=5, method="inclusive")`` (linear
                        interpolation between order statistics, never outside [min, max]; one
                        sample: all three equal). ``unit="ms"`` gives ``median_ms``… instead.
    :class:`measure`    context manager: one block's wall time (perf_counter), CPU time of all the
                        process's threads (``time.process_time``), and from ``resource.getrusage``
                        the user and system CPU seconds and the minor / major page faults it
                        caused; the process's max RSS so far. On CUDA it synchronizes on entry and
                        exit so the wall time covers the queued work.
    :func:`node_batch_variants`, :func:`node_batch_cap` (:func:`planner_setting`)
                        the A/B of the planner's node-batch cap (``--node-batch`` of
                        bench_paper_case.py / bench_kinks_speed.py): rows "rule @ 16MiB", the
                        cap set for one block and restored after.

Peak memory (what a call needs on top of what exists before it)
    :class:`track_peak` context manager, :func:`peak_memory` the same for one call.
        CUDA  ``torch.cuda.reset_peak_memory_stats()``; peak = ``max_memory_allocated()``,
              before = ``memory_allocated()`` (tensors only; the caching allocator's reserve and
              the CUDA context are not counted).
        CPU   the RSS high-water mark is reset to the current RSS by writing "5" to
              ``/proc/self/clear_refs``; peak = VmHWM, before = VmRSS (``/proc/self/status``).
              Memory that the allocator freed earlier but kept mapped is reused without raising
              RSS, so in a long-lived process this under-counts small allocations: measure in a
              fresh process (:func:`peak_memory_subprocess`) where it matters. Where the reset is
              not possible (not Linux, no permission) the figure is ``ru_maxrss``, the process's
              lifetime maximum: an upper bound, said so in ``method``.
    :func:`peak_memory_subprocess`  :func:`peak_memory` of ``setup(*args)()`` in a fresh Python
        process (``setup`` is a module-level function of a script or module; it builds the inputs,
        warms up, and returns the call to measure), so that nothing earlier in the benchmark
        counts.

Environment and results
    :func:`environment` the row every result carries: device name, torch / triton / Python
        versions, host, CPU model, cores, torch threads, OMP_WAIT_POLICY / OMP_NUM_THREADS, load
        average and the UTC date and time. A shared CPU distorts timings (torch's default OpenMP
        spin-waiting was measured 50× slower on a 2-core machine at load 10,
        bench/results/cpu_e2e.md): the row records the conditions.
    :data:`RESULTS_DIR` bench/results of the source checkout (env ``EXPLAIND_BENCH_RESULTS``
        overrides), the one folder results go to; :func:`results_path` maps a bare file name
        there; :func:`write_results` writes JSON with the environment row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["RESULTS_DIR", "Measurement", "device_name", "environment", "format_environment",
           "measure", "peak_memory", "peak_memory_subprocess", "results_path", "set_threads",
           "summarize", "sync", "time_call", "track_peak", "write_results", "node_batch_cap",
           "node_batch_variants"]


def _results_dir() -> Path:
    if os.environ.get("EXPLAIND_BENCH_RESULTS"):
        return Path(os.environ["EXPLAIND_BENCH_RESULTS"])
    checkout = Path(__file__).resolve().parents[2]  # explaind_fast/testing/benchmark.py
    if (checkout / "bench").is_dir():
        return checkout / "bench" / "results"
    return Path.cwd() / "bench" / "results"  # an installed (non-editable) package


RESULTS_DIR = _results_dir()


def _device(device) -> torch.device:
    return torch.device("cpu" if device is None else device)


def sync(device=None) -> None:
    """torch.cuda.synchronize(device) on a CUDA device; nothing on the CPU."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(n) -> int:
    """torch.set_num_threads(n) when n is given; returns the thread count in effect."""
    if n is not None:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------- timing

def time_call(fn, *, repeats, warmup=1, device=None, sync=True) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls.

    CPU: ``time.perf_counter`` around each call. CUDA (``sync=True``): CUDA events around each
    call, with ``torch.cuda.synchronize()`` before the start event and before reading the time;
    ``sync=False`` times the host side only (perf_counter, no synchronize: launch overhead).
    """
    device = _device(device)
    cuda = device.type == "cuda" and sync
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times, unit="s") -> dict:
    """``{"median_s", "p20_s", "p80_s", "n"}`` of seconds (``unit="ms"``: ``median_ms``…, in ms).

    median: ``statistics.median``; p20/p80: the first and last of
    ``statistics.quantiles(times, n=5, method="inclusive")``; one sample gives all three equal.
    """
    times = [float(t) for t in times]
    if not times:
        raise ValueError("summarize() needs at least one time")
    scale = {"s": 1.0, "ms": 1e3}[unit]
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {f"median_{unit}": scale * statistics.median(times), f"p20_{unit}": scale * q[0],
            f"p80_{unit}": scale * q[-1], "n": len(times)}


@dataclasses.dataclass
class Measurement:
    """What :class:`measure` recorded for one block (filled in on exit)."""

    wall_s: float = float("nan")
    cpu_s: float = float("nan")        # time.process_time: all threads, user + system
    user_s: float = float("nan")       # getrusage ru_utime
    system_s: float = float("nan")     # getrusage ru_stime
    minor_faults: int = 0              # getrusage ru_minflt (page faults served without I/O)
    major_faults: int = 0              # getrusage ru_majflt (page faults that needed I/O)
    max_rss_bytes: int = 0             # getrusage ru_maxrss at exit: the process's lifetime peak

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class measure:
    """``with measure(device) as m: work()`` → ``m.wall_s``, ``m.cpu_s``, ``m.user_s``,
    ``m.system_s``, ``m.minor_faults``, ``m.major_faults``, ``m.max_rss_bytes``.

    Wall: perf_counter (on CUDA after a synchronize at entry and exit). CPU: process_time and
    ``resource.getrusage(RUSAGE_SELF)`` differences, so other threads of the process (OpenMP
    workers, a write-behind thread) count too.
    """

    def __init__(self, device=None):
        self.device = _device(device)
        self.result = Measurement()

    def __enter__(self) -> Measurement:
        sync(self.device)
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu = time.process_time()
        self._t0 = time.perf_counter()
        return self.result

    def __exit__(self, *exc):
        sync(self.device)
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._cpu
        ru = resource.getrusage(resource.RUSAGE_SELF)
        m = self.result
        m.wall_s, m.cpu_s = wall, cpu
        m.user_s, m.system_s = ru.ru_utime - self._ru.ru_utime, ru.ru_stime - self._ru.ru_stime
        m.minor_faults, m.major_faults = ru.ru_minflt - self._ru.ru_minflt, ru.ru_majflt - self._ru.ru_majflt
        m.max_rss_bytes = _maxrss_bytes(ru)
        return False


def _maxrss_bytes(ru=None) -> int:
    ru = ru or resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB


# ----------------------------------------------------------------------------------- peak memory

def _proc_status_bytes(key) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


class track_peak:
    """``with track_peak(device) as p: work()`` → ``p["peak_bytes"]`` (high-water mark during the
    block), ``p["before_bytes"]``, ``p["peak_extra_bytes"]`` = peak − before, ``p["method"]``.
    CUDA: allocated tensor memory (max_memory_allocated after reset_peak_memory_stats); CPU: RSS
    (VmHWM reset through /proc/self/clear_refs; fallback ru_maxrss, an upper bound)."""

    def __init__(self, device=None):
        self.device = _device(device)
        self.result = {}

    def __enter__(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._method = "torch.cuda.max_memory_allocated"
        else:
            self._before = _proc_status_bytes("VmRSS") if os.path.exists("/proc/self/status") else 0
            self._method = ("VmHWM - VmRSS" if _reset_hwm()
                            else "ru_maxrss (lifetime maximum: an upper bound)")
        return self.result

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._method.startswith("VmHWM"):
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = _maxrss_bytes()
        self.result.update(peak_bytes=peak, before_bytes=self._before,
                           peak_extra_bytes=max(0, peak - self._before), method=self._method)
        return False


def peak_memory(fn, device=None) -> dict:
    """Peak memory of one call ``fn()`` in this process: :class:`track_peak`'s dict."""
    with track_peak(device) as peak:
        fn()
    return peak


def peak_memory_subprocess(setup, *args, device=None, timeout=None) -> dict:
    """:func:`peak_memory` of ``setup(*args)()`` in a fresh Python process.

    ``setup`` must be a module-level function of an importable file (a bench script is fine, also
    when it runs as ``__main__``); ``args`` must be JSON-serialisable. The child imports that file,
    calls ``setup(*args)`` (build the inputs, warm up, return the call) and measures the call, so
    the inputs and everything before the call count as "before". The dict also has
    ``"method": "<method> (subprocess)"``.
    """
    module = sys.modules[setup.__module__]
    path = os.path.abspath(module.__file__)
    device = str(_device(device))
    cmd = [sys.executable, "-m", __name__, "--peak-child", path, setup.__qualname__,
           json.dumps(list(args)), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess {setup.__qualname__}{tuple(args)} failed:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_child(path, qualname, args_json, device) -> dict:
    name = "_bench_peak_child_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setup = module
    for part in qualname.split("."):
        setup = getattr(setup, part)
    fn = setup(*json.loads(args_json))
    result = peak_memory(fn, device)
    result["method"] += " (subprocess)"
    return result


# ------------------------------------------------------------------------------ environment row

def _triton_version():
    if "triton" in sys.modules:
        return getattr(sys.modules["triton"], "__version__", None)
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("triton")
        except PackageNotFoundError:
            return None
    except ImportError:  # pragma: no cover
        return None


def device_name(device=None) -> str:
    """"NVIDIA H100 80GB HBM3" on CUDA; "cpu (x86_64, 2 cores, 2 threads)" on the CPU."""
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)")


def environment(device=None) -> dict:
    """The environment row: what a timing depends on besides the code."""
    device = _device(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpus_usable"] = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                   device_memory_bytes=props.total_memory)
    return env


def format_environment(env) -> str:
    """One comment line for a printed table: ``# device, torch …, load …, date``."""
    load = env.get("load_average")
    parts = [env["device"], f"torch {env['torch']}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    parts += [f"python {env['python']}", f"host {env['host']}",
              f"OMP_WAIT_POLICY={env.get('omp_wait_policy') or 'unset'}"]
    if load:
        parts.append("load " + "/".join(f"{x:.1f}" for x in load))
    parts.append(env["date_utc"])
    return "# " + ", ".join(parts)


# ------------------------------------------------------------------------------ planner A/B

def node_batch_variants(rules, mib_values=()):
    """[(row name, rule, MiB or None)]: every rule at every value of the planner's node-batch cap
    (``NODE_BATCH_BYTES``, in MiB), rows named "rule @ 16MiB"; the rules as they are when
    ``mib_values`` is empty (the A/B of ``--node-batch`` in the bench scripts)."""
    if not mib_values:
        return [(r, r, None) for r in rules]
    return [(f"{r} @ {b}MiB", r, b) for r in rules for b in mib_values]


@contextlib.contextmanager
def planner_setting(name, value):
    """The planner's module constant ``name`` (e.g. "CPU_TRAIN_PASS_BYTES") set to ``value``
    inside the block (None: unchanged), restored after."""
    from explaind_fast.attribution import planner
    before = getattr(planner, name)
    if value is not None:
        setattr(planner, name, value)
    try:
        yield
    finally:
        setattr(planner, name, before)


def node_batch_cap(mib):
    """The planner's NODE_BATCH_BYTES set to ``mib`` MiB inside the block (None: unchanged),
    restored after."""
    return planner_setting("NODE_BATCH_BYTES", None if mib is None else int(mib) << 20)


# ------------------------------------------------------------------------------------- results

def results_path(path_or_name) -> Path:
    """A bare file name ("ops_cpu.json") → RESULTS_DIR / name; any path with a directory part
    (also "./x.json") is used as given."""
    p = Path(path_or_name)
    return RESULTS_DIR / p if p.parent == Path(".") and not str(path_or_name).startswith(".") else p


def write_results(path_or_name, rows, *, device=None, env=None, **meta) -> Path:
    """Write JSON: ``{"environment": env or environment(device), **meta, "rows": rows}``.

    ``rows`` a list → stored under "rows"; a dict (a script's whole result) → its keys are written
    as they are (an "environment" key in it wins). Creates the folder; returns the path written.
    """
    path = results_path(path_or_name)
    payload = {"environment": env or environment(device), **meta}
    payload.update(rows if isinstance(rows, dict) else {"rows": rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    return path


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 5 and argv[0] == "--peak-child":
        print(json.dumps(_peak_child(*argv[1:])))
        return
    print(json.dumps(environment("cuda" if torch.cuda.is_available() else "cpu"), indent=1))


if __name__ == "__main__":
    _main()
