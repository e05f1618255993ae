"""Re-export of `fedpeft.simulations.harness.tiny_models` under the name the tests import."""

from fedpeft.simulations.harness.tiny_models import build_tiny_bert, build_tiny_llama, build_tokenizer

__all__ = ["build_tiny_bert", "build_tiny_llama", "build_tokenizer"]
