"""Re-export of `fedpeft.simulations.tiny_models` under the name the tests import."""

from fedpeft.simulations.tiny_models import build_tiny_bert, build_tiny_llama, build_tokenizer

__all__ = ["build_tiny_bert", "build_tiny_llama", "build_tokenizer"]
