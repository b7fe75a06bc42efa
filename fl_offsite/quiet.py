"""Keep the console to fl-offsite's own lines: library progress bars and chatter off."""

import logging


def quiet_libraries() -> None:
    import datasets
    import flwr.common.logger  # noqa: F401  (sets its own level on import: import it first)
    import huggingface_hub
    import transformers

    logging.getLogger("flwr").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # hub retries: the error line says it
