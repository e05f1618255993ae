"""Flower Simulation Engine runs of fedpeft (`peft-sim`) and their reports."""
