"""Helpers for test scripts: emit one RESULT line per call, atomically."""

import json
import os


def emit(obj, tag="RESULT"):
    """Write ``tag {json}`` as one write(2) so lines from several ranks never interleave."""
    os.write(1, f"{tag} {json.dumps(obj)}\n".encode())
