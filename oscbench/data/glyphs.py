"""`glyphs`: printed digits rendered offline, as many independent images as asked for.

The ten digits in the 21 text fonts that matplotlib ships (DejaVu Sans, Sans Mono and
Serif, STIX and Computer Modern, their bold and italic faces), drawn once by Pillow at 32x32,
then each image a random font and digit under a seeded random affine map (rotation, scale,
shear, shift) to `image_size`, plus Gaussian noise, on the device with torch. Nothing is
downloaded; the task is fixed by `task_seed` (the run's seed only orders batches), and the
test set is as large as `test_size` asks, so that sampling noise on accuracy is small
(10,000 images: at most 0.5 points of standard error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from oscbench.data.base import DATASETS, HeldOut, TensorData
from oscbench.registry import check

FACES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral", "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10")
BASE = 32  # the glyphs' canvas before the affine map


@dataclass
class GlyphsConfig(HeldOut):
    image_size: int
    train_size: int
    test_size: int
    rotation: float  # largest rotation, degrees
    scale: tuple[float, float]  # range of the glyph's scale
    shear: float  # largest shear
    shift: float  # largest shift, a share of the image
    noise: float  # std of the added Gaussian noise (ink is 1, paper 0)
    task_seed: int  # fixes the images; the run's seed only orders batches

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("image_size", "train_size", "test_size"):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        check(self.noise >= 0, "noise", self.noise, ">= 0")
        lo, hi = self.scale
        check(0 < lo <= hi, "scale", list(self.scale), "[low, high] with 0 < low <= high")


def fonts() -> list[Path]:
    """matplotlib's bundled text fonts, in a fixed order."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(
        p for p in root.glob("*.ttf") if p.name.startswith(FACES) and "Display" not in p.name
    )


def base_glyphs() -> torch.Tensor:
    """(fonts, 10, BASE, BASE) in [0, 1]: each digit centred in each font (Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    out = torch.zeros(len(fonts()), 10, BASE, BASE)
    for i, path in enumerate(fonts()):
        font = ImageFont.truetype(str(path), int(BASE * 0.7))
        for digit in range(10):
            image = Image.new("L", (BASE, BASE))
            draw = ImageDraw.Draw(image)
            left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
            at = ((BASE - right - left) / 2, (BASE - bottom - top) / 2)
            draw.text(at, str(digit), fill=255, font=font)
            out[i, digit] = (
                torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(BASE, BASE)
                / 255.0
            )
    return out


def render(cfg: GlyphsConfig, glyphs: torch.Tensor, n: int, g: torch.Generator) -> tuple:
    """`n` images of random fonts and digits under random affine maps, and their labels."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    font = torch.randint(len(glyphs), (n,), generator=g)
    y = torch.randint(10, (n,), generator=g)
    angle = uniform(-cfg.rotation, cfg.rotation) * math.pi / 180
    scale = uniform(*cfg.scale)
    shear = uniform(-cfg.shear, cfg.shear)
    dx, dy = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> glyph coordinates
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, dx], 1), torch.stack([sin, cos, dy], 1)], 1
    )
    size = (n, 1, cfg.image_size, cfg.image_size)
    grid = F.affine_grid(theta, size, align_corners=False)
    x = F.grid_sample(glyphs[font, y][:, None], grid, align_corners=False)
    return x + cfg.noise * torch.randn(size, generator=g), y


@DATASETS.register("glyphs", GlyphsConfig)
def glyphs(cfg: GlyphsConfig, seed: int, device: torch.device) -> TensorData:
    g = torch.Generator().manual_seed(cfg.task_seed)
    base = base_glyphs()
    x_train, y_train = render(cfg, base, cfg.train_size, g)
    x_test, y_test = render(cfg, base, cfg.test_size, g)
    mean, std = x_train.mean().item(), x_train.std().item()
    return TensorData(
        x_train.to(device),
        y_train.to(device),
        x_test.to(device),
        y_test.to(device),
        num_classes=10,
        seed=seed,
        mean=(mean,),
        std=(std,),
    )
