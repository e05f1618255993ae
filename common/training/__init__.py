"""Local training pieces shared by clients and server: objectives, evaluation, checkpointing."""
