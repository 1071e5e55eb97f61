"""The transformer's settings: the platform settings it reads, typed, read once in `main`.

The transformer runs in its own environment (Alibi Detect, numpy<2) and cannot import the core's
`fraud.settings`; these fields carry the same environment variable names and defaults as the
core's fields of the same name (tests/test_settings.py checks that they agree).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SettingsError(ValueError):
    """A setting's value is unusable; the message names its environment variable."""


class TransformerSettings(BaseModel):
    """Settings of `python -m drift_transformer` (its options override them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: default: where KServe's storage initializer puts the model (the bundle) in the pod
    bundle: Path = Field(
        default=Path("/mnt/models"),
        json_schema_extra={"env": "FRAUD_BUNDLE", "meaning": "bundle directory the transformer serves"},
    )

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: _env_name(field.json_schema_extra) for name, field in cls.model_fields.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TransformerSettings:
        """The settings in `environ` (default: the process environment); empty values count as unset."""
        environ = os.environ if environ is None else environ
        values = {
            name: environ[env].strip() for name, env in cls.env_names().items() if (environ.get(env) or "").strip()
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            env = cls.env_names().get(name, name)
            raise SettingsError(f"{env}={values.get(name, '')!r}: {error['msg']}") from None


def _env_name(extra: Any) -> str:
    return str(extra["env"])
