"""Keep the console to fl-offsite's own lines: library progress bars and chatter off.

Set through the libraries' own environment variables, which costs no import (a bad config is
refused in about a second) and reaches every process started afterwards (Ray workers); the
calls cover the libraries this process has already imported."""

import logging
import os
import sys

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",  # hub retries: the error line says it
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def quiet_libraries() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub
        huggingface_hub.utils.logging.set_verbosity_error()
    if "flwr" in sys.modules:
        import flwr.common.logger  # noqa: F401  (sets its own level on import: import it first)
        logging.getLogger("flwr").setLevel(logging.ERROR)
