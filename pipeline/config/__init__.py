"""Experiment configuration: YAML layers over typed defaults, validated before anything heavy."""

from pipeline.config.errors import ConfigError
from pipeline.config.loader import load_config

__all__ = ["ConfigError", "load_config"]
