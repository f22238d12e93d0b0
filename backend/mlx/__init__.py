"""The MLX backend: mlx-lm models behind the engine contract (Apple Silicon; Linux CPU via
`mlx[cpu]`). Nothing here imports MLX at module import: `require_mlx` says how to install it.
"""

from __future__ import annotations

import importlib
import platform
import sys
from collections.abc import Sequence

from config import ConfigError

MLX_MODULES = ("mlx.core", "mlx_lm")
INSTALL_HINT = (
    "pip install mlx mlx-lm (Apple Silicon) or pip install 'mlx[cpu]' mlx-lm (Linux x86_64)"
)


def is_apple_silicon() -> bool:
    """Whether this is macOS on an arm64 CPU, where MLX runs on the GPU."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def mlx_importable(modules: Sequence[str] = MLX_MODULES) -> bool:
    """Whether every MLX module imports."""
    try:
        require_mlx(modules)
    except ConfigError:
        return False
    return True


def require_mlx(modules: Sequence[str] = MLX_MODULES) -> None:
    """Import `modules`, or raise the start-up error naming the missing one and the fix."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken native library
            raise ConfigError(
                f"BACKEND_IMPL=mlx needs the mlx and mlx-lm packages, but {name} does not "
                f"import ({type(exc).__name__}: {exc}); install them with: {INSTALL_HINT}"
            ) from exc
