"""What peers agree on: the federation plan, delta specs, Flower record I/O, topology names."""
