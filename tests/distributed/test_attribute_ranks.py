"""attribute(...) on 2 gloo ranks (spawned processes, FileStore) equals the single-process run.

One spawn runs every case (spawning costs seconds; the cases take about 20 s together on a loaded
2-core CPU): each mode × data × credit combination the four splits of
explaind_fast.attribution.distributed cover, gather_to 0 / 1 / "all", a rank whose trajectory read
raises mid-run (in a split with per-step collectives and in one without), and an argument error
on every rank. Float64: kernel and reg within 1e-12 of their scale (summation order only), the
quadrature residuals and the step identity (rounding-level numbers) within 1e-12 of the output
scale, evaluations, plan, axes, quadrature text and certificate problems equal.
"""
import pytest

from explaind_fast.attribution import distributed as D
from explaind_fast.testing.ranks import run_ranks

GL = "gauss-legendre:3"
CASES = [
    ("all-forward-each", {}, dict(data="all", mode="forward", steps="each", params="tensor",
                                  quadrature=GL), "steps"),
    ("all-reverse-all", {}, dict(data="all", mode="reverse", params="module", quadrature=GL),
     "steps"),
    ("all-forward-auto", {"act": "relu"}, dict(data="all", mode="forward", steps="each",
                                               params="tensor"), "tangents"),
    ("all-reverse-auto", {"act": "relu"}, dict(data="all", mode="reverse", steps=2,
                                               params="tensor"), "rows"),
    ("label-forward-update", {}, dict(data="label", mode="forward", credit="update",
                                      steps="each", params="tensor", quadrature=GL), "tangents"),
    ("sample-reverse-update", {}, dict(data="sample", mode="reverse", credit="update",
                                       steps="each", params="module", quadrature=GL), "rows"),
    ("label-gradient", {}, dict(data="label", credit="gradient", params="tensor"), "rows"),
    ("sample-gradient-each", {}, dict(data="sample", credit="gradient", steps="each",
                                      quadrature=GL), "rows"),
    ("sample-forward-all", {}, dict(data="sample", mode="forward", quadrature=GL), "tangents"),
    ("sample-gradient-partitions", {"env": {"EXPLAIND_DIST_SPLIT": "partitions"}},
     dict(data="sample", credit="gradient", steps="each", output=0, quadrature=GL,
          memory_budget="minimum"), "partitions"),
    ("label-gradient-partitions", {"env": {"EXPLAIND_DIST_SPLIT": "partitions"}}, dict(data="label", credit="gradient", steps="each",
                                           output=0, params="tensor", quadrature=GL),
     "partitions"),
]
OTHER = [
    {"name": "gather-all", "gather_to": "all",
     "kw": dict(data="all", steps="each", params="tensor", quadrature=GL)},
    {"name": "gather-1", "gather_to": 1,
     "kw": dict(data="label", mode="forward", steps="each", params="tensor", quadrature=GL)},
    {"name": "fail-tangents", "fail_rank": 1,
     "kw": dict(data="label", mode="forward", steps="each", quadrature=GL)},
    {"name": "fail-steps", "fail_rank": 0, "kw": dict(data="all", quadrature=GL)},
    {"name": "fail-rows", "fail_rank": 1, "kw": dict(data="label", credit="gradient",
                                                     quadrature=GL)},
    {"name": "fail-partitions", "fail_rank": 1, "env": {"EXPLAIND_DIST_SPLIT": "partitions"},
     "kw": dict(data="label", credit="gradient", output=0, quadrature=GL)},
    {"name": "bad-argument", "bad": True, "kw": dict(data="all", steps="nonsense")},
]
TOL = 1e-12


@pytest.fixture(scope="module")
def ranks():
    cases = [dict(name=n, kw=kw, **run) for n, run, kw, _ in CASES] + OTHER
    out = run_ranks("explaind_fast.testing.ranks:compare_cases", 2, (cases,), timeout=240,
                    pg_timeout=60)
    for r, x in enumerate(out):
        assert "error" not in x, f"rank {r}: {x['error']}"
    return [x["value"] for x in out]


def _equal(d):
    for k in ("kernel", "reg", "initial", "final", "step_residual", "step_identity",
              "certificate_scale"):
        assert d[k] <= TOL, (k, d[k])
    for k in ("evaluations_equal", "plan_equal", "dims_equal", "quadrature_equal",
              "credit_equal", "certificate_problems_equal"):
        assert d[k], k


@pytest.mark.parametrize("name,split", [(c[0], c[3]) for c in CASES])
def test_two_ranks_equal_one_process(ranks, name, split):
    d = ranks[0][name]
    assert d["split"] == split
    _equal(d)
    assert ranks[1][name] == {"none": True}          # gather_to=0: rank 1 gets None


def test_gather_to(ranks):
    _equal(ranks[0]["gather-all"])
    _equal(ranks[1]["gather-all"])
    assert ranks[0]["gather-1"] == {"none": True}
    _equal(ranks[1]["gather-1"])


@pytest.mark.parametrize("name,bad", [("fail-tangents", 1), ("fail-steps", 0), ("fail-rows", 1),
                                      ("fail-partitions", 1)])
def test_a_failing_rank_stops_every_rank(ranks, name, bad):
    for r in (0, 1):
        got = ranks[r][name]
        assert got["failed"] == [bad], got
        assert f"rank {bad}" in got["error"] and "injected read failure" in got["error"]
        assert got["seconds"] < 30                     # no wait for the process group timeout


def test_the_same_argument_error_everywhere_is_the_error_itself(ranks):
    for r in (0, 1):
        assert ranks[r]["bad-argument"]["plain_error"].startswith("ValueError")


def test_context_without_a_process_group():
    assert D.context("auto") is None
    assert D.context(False) is None
    with pytest.raises(ValueError, match="initialized"):
        D.context(True)
    with pytest.raises(ValueError, match="distributed="):
        D.context("yes")


def test_share_row_chunks_cuts_to_world():
    assert len(D.share_row_chunks(4, 3, 4, 3, 2)) == 2           # samples first
    chunks = D.share_row_chunks(1, 4, 1, 4, 2)                    # then outputs
    assert len(chunks) == 2 and all(c[0] == slice(0, 1) for c in chunks)
    assert len(D.share_row_chunks(4, 3, 1, 3, 2)) == 4            # the plan's when enough


def test_a_dead_rank_stops_the_others():
    """A rank whose process exits mid-run (os._exit in a θ read): the survivor's next collective
    fails (gloo sees the closed connection; otherwise the process group's timeout, 20 s here)
    and it raises DistributedAttributionError instead of hanging."""
    case = {"name": "die", "fail_rank": 1, "die": True,
            "kw": dict(data="label", mode="forward", steps="each", quadrature=GL)}
    out = run_ranks("explaind_fast.testing.ranks:compare_cases", 2, ([case],), timeout=120,
                    pg_timeout=20)
    assert out[1] == {"error": "no result (the process died)"}
    got = out[0]["value"]["die"]
    assert got["failed"] == [0] and "died or timed out" in got["error"], got
