"""vmferry: a live-migration manager for QEMU virtual machines."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
