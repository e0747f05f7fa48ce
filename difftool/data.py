"""The tutorial's preprocessing (resize, random horizontal flip, scale to [-1, 1]) on PIL + torch."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageDataset(torch.utils.data.Dataset):
    """Rows with an `image` column, as {"images": float tensor (3, size, size) in [-1, 1]}."""

    def __init__(self, rows, image_size: int, random_flip: bool):
        self.rows = rows
        self.image_size = image_size
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.rows[index]["image"].convert("RGB")
        # bilinear with PIL's antialiasing, as torchvision's Resize does on PIL images
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"images": pixels}
