"""Per-sample losses for :func:`explaind_fast.attribute`, language models included (the
definitions and the Hugging Face recipe: :mod:`explaind_fast.model.losses`)."""
from .model.losses import (IGNORE_INDEX, causal_lm_batch_weights, causal_lm_loss,
                           causal_lm_token_count, causal_lm_token_losses, cross_entropy)

__all__ = ["causal_lm_loss", "causal_lm_token_losses", "causal_lm_batch_weights",
           "causal_lm_token_count", "cross_entropy", "IGNORE_INDEX"]
