"""Model registry: build a model from the config, and describe it to the rest of the runtime."""

from bigtrain.models.gpt import build_causal_lm, flops_per_token, transformer_blocks

__all__ = ["build_causal_lm", "flops_per_token", "transformer_blocks"]
