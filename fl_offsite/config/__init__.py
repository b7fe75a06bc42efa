"""The run config (``Config``) and how it is read (``load``); see ``configs/demo.yaml``."""

from .loading import build_section, dump, load, parse_override, set_dotted
from .run import Config

__all__ = ["Config", "build_section", "dump", "load", "parse_override", "set_dotted"]
