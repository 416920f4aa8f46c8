"""How commands print a report: the same plain data the library returns, as JSON or as aligned lines."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def print_report(report: Mapping[str, Any], as_json: bool) -> None:
    """One JSON object, or one `key: value` line per field with the keys right-aligned."""
    if as_json:
        print(json.dumps(report))
        return
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:>{width}}: {value}")
