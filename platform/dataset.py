"""What every dataset is, whatever its source: uint8 images (or clips) with labels, captions and
masks where it has them. A leaf of the data layer: loaders (data.py, synthetic*.py) build it and
streaming.py decodes files the same way (`read_image`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train_images: torch.Tensor  # uint8 [N, 3, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_captions: list[str] | None = None  # one per image, where the data has them
    test_captions: list[str] | None = None
    class_prompts: list[list[str]] | None = None  # per class, captions that describe it (zero-shot)
    # Images pretraining draws from instead of train_images: unlabelled ones (`data.pretrain`; the
    # labelled splits then serve evaluation only), or the training files larger (`data.source_size`).
    pretrain_images: torch.Tensor | None = None
    pretrain_labelled: bool = False  # pretrain_images are train_images' files (`data.source_size`)
    # Video only: the instance id of every pixel of every test frame (0: background), uint8
    # [M, T, H, W]; evaluation propagates the first frame's through the clip.
    test_masks: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def kind(self) -> str:
        """ "video" (clips [N, T, 3, H, W]) or "images" ([N, 3, H, W])."""
        return "video" if self.train_images.dim() == 5 else "images"

    @property
    def ssl_images(self) -> torch.Tensor:
        """What self-supervised training draws its batches from."""
        return self.train_images if self.pretrain_images is None else self.pretrain_images

    def example_images(self, count: int) -> torch.Tensor:
        """`count` test images as an encoder takes them (of a video: frames of the first clip)."""
        return self.test_images[0, :count] if self.kind == "video" else self.test_images[:count]

    def describe(self) -> str:
        if self.kind == "video":
            return (
                f"{self.name}: {len(self.train_images)} train / {len(self.test_images)} test clips of "
                f"{self.train_images.shape[1]} frames, {self.image_size}px"
            )
        pretrain = ""
        if self.pretrain_images is not None:
            what = (
                "the training images" if self.pretrain_labelled else f"{len(self.pretrain_images)} unlabelled"
            )
            source = self.pretrain_images.shape[-1]
            crops = "" if source == self.image_size else f" (crops from {source}px)"
            pretrain = f"pretraining on {what}{crops}, "
        return (
            f"{self.name}: {pretrain}{len(self.train_images)} train / {len(self.test_images)} test, "
            f"{len(self.classes)} classes, {self.image_size}px"
        )


class DataError(ValueError):
    """Bad data on disk; the message names the file or folder."""


def no_labels(count: int) -> torch.Tensor:
    """Labels of data that has none (clips have masks, not classes): -1 each."""
    return torch.full((count,), -1, dtype=torch.long)


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    resized = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).byte()


# A decoded image larger than this is refused before its pixels are decoded: a few MB of PNG can
# declare 30000 x 30000 pixels (2.7 GB decoded, 10.8 GB once resized in float).
MAX_IMAGE_PIXELS = 8192 * 8192


def read_image(path: Path, size: int) -> torch.Tensor:
    """uint8 RGB [3, size, size] of an image file. Its header is read first (Pillow): the size is
    bounded before anything is decoded. JPEGs are then decoded by torchvision (libjpeg-turbo,
    the fast path for photo datasets); every other format by Pillow, whose decoders raise on a
    damaged file where libpng, through torchvision, crashed the process (a PNG whose image data
    ends before its first row)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        encoded = Path(path).read_bytes()  # read once: Pillow's header and the decoder share it
        with warnings.catch_warnings():  # Pillow's bomb warning: the bound below says it, once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(encoded))
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"{path}: declares {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                    "an image may have (a decompression bomb?)"
                )
            if width == 0 or height == 0:
                raise DataError(f"{path}: has no pixels ({width}x{height})")
            decoded = _decode_jpeg(encoded, path) if image.format == "JPEG" else _decode_with_pillow(image)
    except DataError:
        raise  # already names the file (a ValueError, which the next line would wrap again)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode ({err})") from None
    return decoded if decoded.shape[-2:] == (size, size) else resized(decoded[None], size)[0]


def _decode_jpeg(encoded: bytes, path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:  # torchvision's messages end with the reason after the last comma
        raise DataError(f"{path}: cannot decode ({str(err).rsplit(',', 1)[-1].strip()})") from None


def _decode_with_pillow(image) -> torch.Tensor:
    import numpy as np

    rgb = np.asarray(image.convert("RGB"))  # raises OSError on truncated or damaged data
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
