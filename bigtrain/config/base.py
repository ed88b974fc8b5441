"""The config error type and the base class of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line meant for the user."""


class _Section(BaseModel):
    """A config section: unknown keys are errors, and a field's docstring is its description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              use_attribute_docstrings=True)

