"""Configuration: the typed settings model, its sources and logging set-up."""

from lesiontrack.config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
