"""Demos reproducing the paper's validations: ``python -m explaind_fast demo grokking|digits-cnn``.

Submodules: ``models`` (ModularAdditionTransformer, DigitsCNN), ``data`` (modular addition pairs,
scikit-learn digits), ``grokking``, ``digits_cnn`` (the demos), ``report`` and ``plots``.
"""
