"""Images in: decode, preprocess (as CLIPImageProcessor does) and content-hash.

Owns turning what a user sends (raw PNG/JPEG bytes, a base64 string, a
``data:image/...;base64,`` URL, a PIL image) into RGB pixels, the pixels into the
vision tower's input, and the pixels into a content hash. Errors are
InvalidRequestError naming the request field. It must not run models.

The content hash covers the *decoded* RGB pixels (and the size), not the bytes as sent:
the same picture sent as PNG bytes, as base64, as a data URL or as a PIL image is one
embedding-cache entry and one prefix-cache key, and what the hash identifies is exactly
what the vision tower sees. Decoding is needed to encode anyway; hashing the pixels adds
well under a millisecond for a 336x336 image.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from splitserve.errors import InvalidRequestError
from splitserve.hashing import hash_bytes
from splitserve.roles.models.config import VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- decode


def load_image(data: Any, field: str = "multi_modal_data.image") -> Image.Image:
    """An RGB PIL image from bytes, base64, a data URL or a PIL image; else InvalidRequestError."""
    if isinstance(data, Image.Image):
        image = data
    elif isinstance(data, bytes | bytearray | memoryview):
        image = _open(bytes(data), field)
    elif isinstance(data, str):
        image = _open(_decode_base64(data, field), field)
    else:
        raise InvalidRequestError(
            f"an image must be PNG/JPEG bytes, a base64 string, a data: URL or a PIL image, "
            f"got {type(data).__name__}",
            field=field,
        )
    return _to_rgb(image)


def _decode_base64(text: str, field: str) -> bytes:
    if text.startswith(("http://", "https://", "file:")):
        raise InvalidRequestError(
            "image URLs are not fetched; send the image as base64 or a data: URL", field=field
        )
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise InvalidRequestError(
                "a data URL must look like data:image/<type>;base64,<data>", field=field
            )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"image is not valid base64 ({e})", field=field) from e


def _open(data: bytes, field: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not in the vision tower
    except UnidentifiedImageError as e:
        raise InvalidRequestError(
            f"{len(data)} bytes that are not an image in a known format (PNG, JPEG, ...)",
            field=field,
        ) from e
    except Exception as e:  # PIL raises OSError (truncated), DecompressionBombError...
        raise InvalidRequestError(
            f"cannot decode image ({len(data)} bytes): {e}", field=field
        ) from e
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_hash(image: Image.Image) -> int:
    """Content hash of an RGB image's pixels and size (see the module docstring)."""
    w, h = image.size
    return hash_bytes(f"{image.mode}:{w}x{h}:".encode() + image.tobytes())


# --------------------------------------------------------------------------- preprocess


@dataclass(frozen=True)
class ImageProcessor:
    """CLIPImageProcessor's steps: resize the shortest edge (bicubic), center crop,
    rescale to [0, 1], normalize; the same arithmetic, so pixel values match it."""

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def for_model(cls, folder: str | Path | None, vision: VisionConfig) -> ImageProcessor:
        """From the folder's preprocessor_config.json, else CLIP's defaults at the tower's size."""
        cfg_file = Path(folder) / "preprocessor_config.json" if folder else None
        if cfg_file is None or not cfg_file.is_file():
            s = vision.image_size
            return cls(shortest_edge=s, resize_hw=None, crop_hw=(s, s))
        return cls.from_dict(json.loads(cfg_file.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ImageProcessor:
        size = cfg.get("size", {"shortest_edge": 224}) if cfg.get("do_resize", True) else None
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = cfg.get("crop_size", 224) if cfg.get("do_center_crop", True) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=size.get("shortest_edge") if size else None,
            resize_hw=(size["height"], size["width"]) if size and "height" in size else None,
            crop_hw=(crop["height"], crop["width"]) if crop else None,
            rescale_factor=cfg.get("rescale_factor", 1 / 255)
            if cfg.get("do_rescale", True)
            else None,
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN))
            if cfg.get("do_normalize", True)
            else None,
            std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        )

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> pixel values [N, 3, H, W] float32."""
        return torch.from_numpy(np.stack([self._one(im) for im in images]))

    def _one(self, image: Image.Image) -> np.ndarray:
        size = self._resize_to(image.size)
        if size is not None and size != image.size:
            image = image.resize(size, resample=self.resample)
        x = np.asarray(image).transpose(2, 0, 1)  # [3, H, W] uint8
        if self.crop_hw is not None:
            x = _center_crop(x, self.crop_hw)
        if self.rescale_factor is not None:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.mean is not None and self.std is not None:
            mean = np.array(self.mean, dtype=np.float32)[:, None, None]
            std = np.array(self.std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)

    def _resize_to(self, wh: tuple[int, int]) -> tuple[int, int] | None:
        """(width, height) after resizing, as transformers computes it."""
        if self.resize_hw is not None:
            return self.resize_hw[1], self.resize_hw[0]
        if self.shortest_edge is None:
            return None
        w, h = wh
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)


def _center_crop(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[C, H, W] -> [C, h, w] around the center, zero-padded where the image is smaller."""
    _, height, width = x.shape
    ch, cw = hw
    if ch > height or cw > width:
        padded = np.zeros((x.shape[0], max(ch, height), max(cw, width)), dtype=x.dtype)
        top, left = -(-(padded.shape[1] - height) // 2), -(-(padded.shape[2] - width) // 2)
        padded[:, top : top + height, left : left + width] = x
        x, height, width = padded, padded.shape[1], padded.shape[2]
    top, left = (height - ch) // 2, (width - cw) // 2
    return x[:, top : top + ch, left : left + cw]
