"""Image file extensions the app reads, without importing torch (pages import this at
start-up). Kept equal to core.data.IMAGE_EXTENSIONS; tests/test_app_pages.py checks it."""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
