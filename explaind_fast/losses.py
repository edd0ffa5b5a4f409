"""Per-sample losses for :func:`explaind_fast.attribute`, language models included (the
definitions and the Hugging Face recipe: :mod:`explaind_fast.model.losses`)."""
from .model.losses import (IGNORE_INDEX, causal_lm_batch_weights, causal_lm_loss,
                           causal_lm_token_count, causal_lm_token_losses, cross_entropy,
                           masked_lm_batch_weights, masked_lm_loss, masked_lm_token_count)

__all__ = ["causal_lm_loss", "causal_lm_token_losses", "causal_lm_batch_weights",
           "causal_lm_token_count", "masked_lm_loss", "masked_lm_token_count",
           "masked_lm_batch_weights", "cross_entropy", "IGNORE_INDEX"]
