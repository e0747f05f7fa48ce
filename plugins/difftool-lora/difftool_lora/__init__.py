"""difftool-lora: the `lora` adapter (peft LoRA on a diffusers model's layers)."""

import difftool

__version__ = "0.1.0"


@difftool.hookimpl
def register_adapters(register):
    register("lora", "difftool_lora.adapter:lora",
             "LoRA (peft) on the attention projections, optionally the ResNet convolutions; the base frozen")
