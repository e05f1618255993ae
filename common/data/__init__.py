"""Task data: records, the built-in task, partitioning."""
