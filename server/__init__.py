"""Cloud-coordinator side of fedpeft: aggregation strategy, run records and the ServerApp."""
