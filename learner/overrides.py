"""Python values written as Hydra command-line overrides (for the commands o2o starts itself)."""

from __future__ import annotations

import re
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

_parser = OverridesParser.create()


def hydra_value(value: Any, nested: bool = False) -> str:
    """`value` written in Hydra's override grammar, so the target reads back the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v, nested=True) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v, nested=True)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        try:  # bare when Hydra reads it back as this string (paths, endpoints), else quoted
            if not nested and _parser.parse_override(f"k={value}").value() == value:
                return value
        except HydraException:  # not valid bare (a quote, an '=')
            pass
        # In a quoted value Hydra unescapes backslashes only before a quote or the closing quote.
        escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
        return f"'{escaped}'"
    raise TypeError(f"cannot write {value!r} as a Hydra override")
