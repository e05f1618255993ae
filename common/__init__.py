"""Shared building blocks of fedpeft: models, PEFT methods, deltas, data and evaluation."""

__version__ = "0.1.0"
