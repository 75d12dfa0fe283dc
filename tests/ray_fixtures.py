"""The Ray cluster of the tests (`tools.ray_local.ray_cluster`), and the check that Ray is installed.

Without the `ray` package (the dev extra installs it) the tests skip, and fail under CI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tools/ is not an installed package
    sys.path.insert(0, str(REPO))

from tools.ray_local import RAY_ENV, RayCluster, ray_cluster  # noqa: E402


def require_ray() -> str:
    """The `ray` command beside this Python; skips the test without it (fails under CI)."""
    exe = Path(sys.executable).with_name("ray")
    try:
        import ray  # noqa: F401
    except ImportError:
        exe = None
    if exe is None or not exe.exists():
        why = "the ray package is not installed (pip install -e '.[dev]' installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return str(exe)


__all__ = ["RAY_ENV", "RayCluster", "ray_cluster", "require_ray"]
