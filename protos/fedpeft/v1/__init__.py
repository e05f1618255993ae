"""Generated protobuf modules of fedpeft's wire formats (see protos/generate.py)."""
