"""Integrations with training frameworks: record their runs without rewriting the training code.

Owns: :mod:`.huggingface` (a Hugging Face ``Trainer`` callback that records a Trainer run, the
index plumbing of its data loader, the sample weights of its losses, and a float64-exact causal
LM loss for ``compute_loss_func``).

May import: the public API and :mod:`explaind_fast.recording` / :mod:`explaind_fast.model`, and
the framework it integrates (transformers), imported only when the submodule is imported. Never
imports: attribution internals, quadrature, ops, demos, testing. Never imported by the runtime (a
top layer beside demos and testing, ``.importlinter``); transformers is an optional dependency
(the ``[test]`` extra installs it, with accelerate for the Trainer).
"""
