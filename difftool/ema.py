"""An exponential moving average of the weights ([ema]), with diffusers' EMAModel."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """diffusers' EMAModel of the trainable weights (frozen ones, e.g. under an adapter, need
    no average), updated every `update_every` steps, optionally kept on the CPU."""

    def __init__(self, model, decay: float, inv_gamma: float, power: float, warmup: bool,
                 update_every: int, on_cpu: bool):
        from diffusers.training_utils import EMAModel

        self.update_every, self.on_cpu = update_every, on_cpu
        self.device = "cpu" if on_cpu else next(model.parameters()).device
        self.average = EMAModel(trainable(model), decay=decay, inv_gamma=inv_gamma, power=power,
                                use_ema_warmup=warmup)
        self.average.to(self.device)

    def update(self, model, global_step: int) -> None:
        if global_step % self.update_every == 0:
            parameters = trainable(model)
            if self.on_cpu:  # EMAModel averages only parameters that require grad
                parameters = [p.detach().to("cpu").requires_grad_() for p in parameters]
            self.average.step(parameters)

    @contextlib.contextmanager
    def swapped_in(self, model):
        """Within the block, `model` holds the averaged weights."""
        parameters = trainable(model)
        self.average.store(parameters)
        with torch.no_grad():
            for shadow, parameter in zip(self.average.shadow_params, parameters):
                parameter.copy_(shadow.to(parameter.device))
        try:
            yield model
        finally:
            self.average.restore(parameters)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
        self.average.to(self.device)  # accelerate loads custom states onto the CPU


def trainable(model) -> list:
    """The parameters that training changes."""
    return [p for p in model.parameters() if p.requires_grad]
