"""The tutorial's preprocessing (resize, random horizontal flip, scale to [-1, 1]) on PIL + torch.

Everything random happens in the training process, from torch's checkpointed RNG or from
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageDataset(torch.utils.data.Dataset):
    """Rows with an `image` column, as {"images": float tensor (3, size, size) in [-1, 1]}."""

    def __init__(self, rows, image_size: int):
        self.rows = rows
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.rows[index]["image"].convert("RGB")
        # bilinear with PIL's antialiasing, as torchvision's Resize does on PIL images
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"images": pixels}


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of `size` rows that depends only on (seed, epoch)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (torch's global RNG)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
