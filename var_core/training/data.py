"""Paired low/high-quality training data from any folder of images.

:class:`PairDataset` crops and flips high-quality patches and degrades them on the fly with
:func:`.degrade.degrade` (VARestorer's DiffBIR-style pipeline), returning the pair in the model
range [-1, 1]: the low-quality image is resized back to the patch size, which is the input
format of VARestorer's one-step restore.

:func:`skimage_photo_folder` provides training photographs on a machine without network: the
colour photographs bundled inside the scikit-image package (``skimage/data/``). Their origin and
licence, as scikit-image's ``skimage.data`` docstrings state them:

* ``astronaut.png`` (512 x 512): Eileen Collins, NASA Great Images database; public domain.
* ``chelsea.png`` (451 x 300): Chelsea the cat; CC0, photographer Stefan van der Walt.
* ``coffee.png`` (600 x 400): coffee cup, courtesy of Pikolo Espresso Bar; CC0, photographer
  Rachel Michetti.
* ``hubble_deep_field.jpg`` (1000 x 872): Hubble eXtreme Deep Field, NASA / HubbleSite; public domain.
* ``ihc.png`` (512 x 512): immunohistochemistry micrograph of colonic glands, Center for Microscopy
  And Molecular Imaging (CMMI); "no known copyright restrictions".
* ``retina.jpg`` (1411 x 1411): fundus photograph of a retina, Mikael Häggström, Wikimedia Commons;
  CC0 1.0.
* ``rocket.jpg`` (640 x 427): launch of DSCOVR on Falcon 9, SpaceX; released into the public domain.

Left out: the grayscale images (camera, coins, moon, page, text, brick, grass, gravel, ...), the
synthetic ones (color wheel, Shepp-Logan phantom, chessboards, logo, horse silhouette) and the
Middlebury stereo pair ``motorcycle_left/right.png``, for which scikit-image states no licence.
scikit-image itself is BSD-3-Clause.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ImageInputError, ParameterError, VARError
from .degrade import DegradationConfig, degrade

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# File in skimage/data/ -> (what it shows, licence); the module docstring gives the sources.
SKIMAGE_PHOTOS = {
    "astronaut.png": ("astronaut Eileen Collins (NASA)", "public domain"),
    "chelsea.png": ("Chelsea the cat (Stefan van der Walt)", "CC0"),
    "coffee.png": ("coffee cup (Rachel Michetti, Pikolo Espresso Bar)", "CC0"),
    "hubble_deep_field.jpg": ("Hubble eXtreme Deep Field (NASA)", "public domain"),
    "ihc.png": ("immunohistochemistry micrograph (CMMI)", "no known copyright restrictions"),
    "retina.jpg": ("fundus photograph (Mikael Häggström, Wikimedia Commons)", "CC0 1.0"),
    "rocket.jpg": ("DSCOVR launch on Falcon 9 (SpaceX)", "public domain"),
}


def image_files(folder: str | Path) -> list[Path]:
    """Every image (:data:`IMAGE_SUFFIXES`) under ``folder``, recursively, sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageInputError(f"training data folder {root} does not exist or is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageInputError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}; point it at a folder of training photographs"
        )
    return paths


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ImageInputError(f"cannot read training image {path}: {e}; remove or replace the file") from e


class PairDataset(Dataset):
    """Random ``size`` x ``size`` crops of the images under ``folder``, with degraded copies.

    Item ``i`` is ``{"hq": (3, size, size), "lq": (3, size, size), "path": str}``, both float32 in
    [-1, 1]; ``lq`` is ``hq`` degraded by :func:`.degrade.degrade` with ``config`` and resized back
    to ``size``. Images are converted to RGB (grayscale expanded, alpha dropped) and upscaled
    (bicubic) when their short side is below ``size``; the crop position, the horizontal flip
    (probability 1/2), with ``channel_shuffle`` a random order of the RGB channels (colour
    augmentation for a handful of photos), and the degradation are drawn from a generator seeded by
    ``(seed, epoch, i)`` only, so any DataLoader worker or DDP rank gives the same item. Call
    :meth:`set_epoch` before each epoch for fresh crops and degradations (with DataLoader
    workers, keep ``persistent_workers=False`` so that they see the new epoch).
    """

    def __init__(self, folder: str | Path, *, size: int = 256, config: DegradationConfig = DegradationConfig(),
                 seed: int = 0, channel_shuffle: bool = False):
        if size < 1:
            raise ParameterError(f"crop size {size} must be a positive number of pixels")
        self.paths = image_files(folder)
        self.size = size
        self.config = config
        self.seed = seed
        self.channel_shuffle = channel_shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def generator(self, index: int) -> torch.Generator:
        """The CPU generator of item ``index`` in the current epoch."""
        state = np.random.SeedSequence((self.seed, self.epoch, index)).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        generator = self.generator(index)
        image = _load_rgb(path)
        w, h = image.size
        if min(w, h) < self.size:
            scale = self.size / min(w, h)
            w, h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((w, h), Image.BICUBIC)
        top = int(torch.randint(h - self.size + 1, (), generator=generator))
        left = int(torch.randint(w - self.size + 1, (), generator=generator))
        crop_HW3 = np.asarray(image.crop((left, top, left + self.size, top + self.size)))
        hq_3HW = rearrange(torch.from_numpy(crop_HW3.copy()), "H W C -> C H W").float() / 255
        if torch.rand((), generator=generator) < 0.5:
            hq_3HW = hq_3HW.flip(-1)
        if self.channel_shuffle:
            hq_3HW = hq_3HW[torch.randperm(3, generator=generator)]
        lq_3HW = degrade(hq_3HW, self.config, generator)
        return {"hq": hq_3HW * 2 - 1, "lq": lq_3HW * 2 - 1, "path": str(path)}


def skimage_photo_folder(dest: str | Path) -> Path:
    """Write the colour photographs bundled with scikit-image (module docstring) as PNGs into ``dest``.

    Returns ``dest``, ready for :class:`PairDataset`. Needs scikit-image installed (it is not
    imported, only its data folder is read).
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise VARError("scikit-image is not installed, so its bundled photographs are not available; "
                       "install it with `pip install scikit-image`, or train on a folder of your own images")
    data_dir = Path(spec.origin).parent / "data"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in SKIMAGE_PHOTOS:
        src = data_dir / name
        if not src.is_file():
            log.warning("scikit-image photo %s is missing from %s; skipped", name, data_dir)
            continue
        _load_rgb(src).save(dest / f"{Path(name).stem}.png")
        written += 1
    if not written:
        raise VARError(f"none of the photographs {list(SKIMAGE_PHOTOS)} are in {data_dir}; "
                       "this scikit-image version does not bundle them, use a folder of your own images")
    return dest
