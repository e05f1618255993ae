"""Logging and library-noise settings, applied by entry points (never at import time)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

OFFLINE_ENV = {
    # Nothing may be downloaded from a hub at run time: models and data are local.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray folds identical-looking lines from different workers; we want every client's progress.
    "RAY_DEDUP_LOGS": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Flower reports usage events to its servers unless told not to; private data, no phoning home.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Library deprecation chatter (torch.jit, transformers v6) in every worker process.
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}


def apply_offline_env() -> None:
    """Set the environment for offline, quiet library use (inherited by worker processes)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def setup_logging(level: int = logging.INFO) -> None:
    """Send fedpeft's log records to stderr once per process."""
    logger = logging.getLogger("fedpeft")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
