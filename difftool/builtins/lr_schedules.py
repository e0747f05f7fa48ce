"""The article's warm-up + cosine-annealing schedule (torch's LinearLR -> CosineAnnealingLR)."""


def warmup_cosine(optimizer, num_training_steps: int, warmup_steps: int = 0,
                  start_factor: float = 0.1, eta_min: float = 0.0):
    """Linear warm-up from `start_factor` x lr over `warmup_steps`, then cosine down to `eta_min`."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    decay_steps = max(1, num_training_steps - warmup_steps)
    if warmup_steps <= 0:
        return CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=eta_min)
    warmup = LinearLR(optimizer, start_factor=start_factor, total_iters=warmup_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=eta_min)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
