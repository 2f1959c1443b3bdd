"""Where a bench's JSON report goes: one writer for every `pdserve bench ...`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_report(doc: Any, output: Path | None, default: Callable[[Any], Any] | None = None) -> None:
    """Writes `doc` as indented JSON to `output` (making its folder) and says where; nothing when
    `output` is None. `default`: how to encode what JSON cannot (as `json.dumps`)."""
    if output is None:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2, default=default))
    print(f"wrote {output}")
