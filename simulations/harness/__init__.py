"""Test and benchmark harnesses: loopback deployments, tiny local models, the per-message baseline ClientApp."""
