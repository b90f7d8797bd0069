"""A source as ``config.data.sources`` names it: one entry, checked, as a spec dataclass."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from itune.data.sources.formats import check_format, check_maps
from itune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``config.data.sources``: where a data set is and how to read its records."""

    name: str
    path: str  # A file, local or gs://, that a reader of `itune.data.sources.READERS` reads.
    format: str = "auto"  # One of FORMATS.
    field_map: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Canonical -> path.
    role_map: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Data role -> ROLES.
    weight: float = 1.0  # Relative share of this source in a mixture.

    def __post_init__(self):
        if not self.name or not self.path:
            raise ConfigError(f"source {self.name!r}: name and path must be non-empty")
        check_format(self.format)
        check_maps(self.format, self.field_map, self.role_map)
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ConfigError(f"source {self.name!r}: weight must be a number, got {self.weight!r}")
        if self.weight <= 0:
            raise ConfigError(f"source {self.name!r}: weight must be positive, got {self.weight}")

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> SourceSpec:
        """From an ``ml_collections.ConfigDict`` or a dict; ``name`` fills in a missing name."""
        return spec_from_values(cls, cfg, name)


def spec_from_values(cls, cfg: Any, name: str | None = None):
    """A source spec dataclass ``cls`` from a config entry, rejecting keys it does not have."""
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if name is not None:
        values.setdefault("name", name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"source {values.get('name')!r}: unknown keys {unknown}; known: {known}")
    for key in ("field_map", "role_map"):
        values[key] = dict(values.get(key) or {})
    return cls(**values)
