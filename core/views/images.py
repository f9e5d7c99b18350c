"""Pictures sized for the screen. No streamlit, no torch (PIL only).

Small images (CIFAR-10 is 32 x 32 pixels) are scaled up with visible pixels instead of a
blur, so a viewer sees exactly what the model got.
"""

from __future__ import annotations

from typing import Any

from PIL import Image


def pixelated(image: Image.Image | Any, px: int) -> Image.Image:
    """A `px` x `px` square with nearest-neighbour pixels (for square model inputs and
    gallery tiles). `image` is a PIL image or an H x W x 3 uint8 array."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    return img.resize((px, px), Image.Resampling.NEAREST)


def panel(image: Image.Image, px: int) -> Image.Image:
    """The picture at `px` wide, aspect kept: small ones enlarged without blurring, large
    ones scaled down smoothly."""
    height = max(1, round(px * image.height / image.width))
    smooth = Image.Resampling.NEAREST if image.width < px else Image.Resampling.LANCZOS
    return image.resize((px, height), smooth)


def thumbnail(image: Image.Image, px: int) -> Image.Image:
    """A preview tile: small images scaled up (longer side `px`) with visible pixels, big
    ones scaled down to at most 2 * `px`."""
    if max(image.size) < px:
        scale = px / max(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)),
                            Image.Resampling.NEAREST)
    image = image.copy()
    image.thumbnail((px * 2, px * 2))
    return image


def app_icon(px: int = 64) -> Image.Image:
    """The app's tab icon, drawn here: three stacked layers, the top one highlighted (the
    stage that trains). Streamlit serves an image icon itself, where a material or emoji
    icon is fetched from the internet and is missing offline."""
    from PIL import ImageDraw

    img = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    bar = px // 5
    for i, colour in enumerate(((47, 111, 222, 255), (120, 130, 150, 255), (120, 130, 150, 255))):
        top = px // 8 + i * (bar + px // 10)
        draw.rounded_rectangle((px // 10, top, px - px // 10, top + bar), radius=bar // 3,
                               fill=colour)
    return img
