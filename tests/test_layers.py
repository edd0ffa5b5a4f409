"""The package layout's contract (docs/design.md §12): checked by import-linter, and every stage
says in its docstring what it owns and what it may import."""
import importlib
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["model", "optim", "store", "recording", "quadrature", "attribution", "ops", "testing",
          "demos", "integrations"]


def test_import_contracts_kept():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (it is in the [test] extra)")
    proc = subprocess.run([exe, "--config", os.path.join(REPO, ".importlinter"), "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 broken" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_docstring_states_its_imports(stage):
    doc = importlib.import_module(f"explaind_fast.{stage}").__doc__ or ""
    assert "May import" in doc and ("Never import" in doc), f"explaind_fast.{stage}: {doc[:200]}"


def test_public_api():
    import explaind_fast as ef
    for name in ("attribute", "Attribution", "TrajectoryRecorder", "Trajectory", "NodeSet",
                 "ParamLayout", "IndexedDataset", "indexed_loader"):
        assert getattr(ef, name) is not None
    assert callable(ef.ops.path_kernel_reduce)
