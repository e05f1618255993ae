"""Benchmarks: entries that print a table, write CSV and plot (speed, memory and quality targets live here)."""
