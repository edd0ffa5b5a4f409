"""Demos reproducing the paper's validations: ``python -m explaind_fast demo grokking|digits-cnn``.

Submodules: ``models`` (ModularAdditionTransformer, DigitsCNN), ``data`` (modular addition pairs,
scikit-learn digits), ``grokking``, ``digits_cnn`` (the demos), ``report`` and ``plots``.
They use only the public API (``from explaind_fast import …``). Their plotting and data
dependencies are the ``[demos]`` extra (matplotlib, scikit-learn), not the runtime's.

May import: the public API, :mod:`explaind_fast.demos` itself. Never imported by the runtime.
"""
import importlib.util

#: module -> the pip package that provides it (all in the [demos] extra)
DEMO_DEPENDENCIES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def check_dependencies(*modules: str) -> None:
    """Raise ImportError naming the [demos] extra if one of ``modules`` is not installed."""
    missing = [DEMO_DEPENDENCIES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the demos need {', '.join(missing)}, which the runtime does not: "
                          "install the demos extra, e.g. pip install --no-build-isolation -e "
                          "\".[demos]\"")
