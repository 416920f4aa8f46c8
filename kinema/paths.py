"""Where kinema looks for models and writes caches."""

import os
from pathlib import Path


def models_dir() -> Path:
    """Folder searched for model names given without a path: `$KINEMA_HOME/models`, default `~/.cache/kinema/models`."""
    home = os.environ.get("KINEMA_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "kinema"  # "~/x" as a shell would read it
    return base / "models"
