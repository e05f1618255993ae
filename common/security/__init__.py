"""Keys, certificates and sealed envelopes."""
