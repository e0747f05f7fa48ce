"""The diffusers "basic training" tutorial, as plain code: the baseline difftool is measured against.

It uses no difftool code. It follows the tutorial step by step: a `TrainingConfig`, the dataset with
`set_transform`, the six-level UNet2DModel, DDPMScheduler, AdamW, cosine schedule with warm-up,
and the Accelerate loop (noise, timesteps, `add_noise`, `accumulate`, MSE, backward, clip, step).
Three things are changed, none of which touches the work per step:
- torchvision's Resize, RandomHorizontalFlip, ToTensor and Normalize are written with PIL and
  numpy, because torchvision does not import beside this machine's torch;
- `train_loop` takes `max_steps` and an `on_step` callback, so that a harness can time steps;
- sampling and saving at epoch ends are left to `evaluate_and_save`, which the harness skips.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TrainingConfig:
    image_size: int = 128
    train_batch_size: int = 16
    eval_batch_size: int = 16
    num_epochs: int = 50
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 500
    save_image_epochs: int = 10
    save_model_epochs: int = 30
    mixed_precision: str = "fp16"
    output_dir: str = "ddpm-butterflies-128"
    seed: int = 0


def preprocess(image, size: int) -> torch.Tensor:
    """Resize((size, size)), RandomHorizontalFlip(), ToTensor(), Normalize([0.5], [0.5])."""
    from PIL import Image

    image = image.resize((size, size), Image.BILINEAR)
    if random.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - 0.5) / 0.5


def make_dataset(data_dir: str, config: TrainingConfig):
    """The image folder as a datasets.Dataset, preprocessed on the fly with set_transform."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=data_dir, split="train")

    def transform(examples):
        return {"images": [preprocess(image.convert("RGB"), config.image_size) for image in examples["image"]]}

    dataset.set_transform(transform)
    return dataset


def make_model(config: TrainingConfig, block_out_channels=(128, 128, 256, 256, 512, 512),
               down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
               layers_per_block: int = 2, **extra):
    """The tutorial's UNet2DModel (its architecture is the default; a harness may pass a smaller one)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=config.image_size, in_channels=3, out_channels=3, layers_per_block=layers_per_block,
                       block_out_channels=block_out_channels, down_block_types=down_block_types,
                       up_block_types=up_block_types, **extra)


def train_loop(config: TrainingConfig, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler,
               max_steps: int | None = None, on_step=None, evaluate_and_save=None):
    """The tutorial's Accelerate loop."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=os.path.join(config.output_dir, "logs"),
    )
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        accelerator.init_trackers("train_example")
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)

    global_step = 0
    for epoch in range(config.num_epochs):
        progress_bar = tqdm(total=len(train_dataloader), disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")
        for batch in train_dataloader:
            clean_images = batch["images"]
            noise = torch.randn(clean_images.shape, device=clean_images.device)
            bs = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,),
                                      device=clean_images.device, dtype=torch.int64)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
                loss = F.mse_loss(noise_pred, noise)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            progress_bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            global_step += 1
            if on_step is not None:
                on_step(global_step, logs["loss"])
            if max_steps is not None and global_step >= max_steps:
                accelerator.end_training()
                return
        if evaluate_and_save is not None and accelerator.is_main_process:
            evaluate_and_save(config, epoch, accelerator.unwrap_model(model), noise_scheduler)
    accelerator.end_training()


def run(data_dir: str, config: TrainingConfig, max_steps: int | None = None, on_step=None, **model_config) -> None:
    """Everything the tutorial builds, then its loop."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    dataset = make_dataset(data_dir, config)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True)
    model = make_model(config, **model_config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                                                   num_training_steps=len(train_dataloader) * config.num_epochs)
    train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler, max_steps, on_step)
