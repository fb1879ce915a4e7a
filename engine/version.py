"""The installed sdrt version, recorded in bundles and PNG metadata."""
from __future__ import annotations

from importlib import metadata

try:
    SDRT_VERSION = metadata.version("sdrt")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    SDRT_VERSION = "0+unknown"
