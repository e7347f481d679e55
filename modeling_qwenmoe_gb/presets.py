"""Named model presets: JSON config files under the repository's `configuration/` folder (installed with the
package as `modeling_qwenmoe_gb/configuration/`)."""

from __future__ import annotations

import json
from pathlib import Path

from .configuration_qwenmoe_gb import QwenMoeGBConfig


def _preset_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "configuration", here.parent / "configuration"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no configuration/ folder next to {here}")


PRESETS = tuple(sorted(p.stem for p in _preset_dir().glob("*.json")))


def load_preset(name: str, **overrides: object) -> QwenMoeGBConfig:
    """A `QwenMoeGBConfig` from a preset name (see `PRESETS`) or a path to a JSON file, with field overrides."""
    path = Path(name)
    if not path.is_file():
        path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"preset={name!r} is unknown: allowed {list(PRESETS)} or a path to a config JSON file")
    fields = json.loads(path.read_text())
    fields.pop("_comment", None)
    fields.update(overrides)
    return QwenMoeGBConfig(**fields)
