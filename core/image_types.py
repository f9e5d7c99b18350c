"""Image file extensions the app reads, without importing torch (pages import this at
start-up). core.data re-exports it: the one list."""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
