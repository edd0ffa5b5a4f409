"""Oracles and helpers for the tests and the benchmarks (not used by the runtime).

Owns: the naive full-tensor reference and the per-sample step-identity check (:mod:`.naive`), small
models and data (:mod:`.models`), recorded tiny training runs (:mod:`.runs`), the op test cases and
tolerances (:mod:`.op_cases`) and the benchmark harness (:mod:`.benchmark`).

May import: every runtime subpackage (model, optim, store, recording, quadrature, attribution,
ops). Never imported by them, nor by the demos.
"""
