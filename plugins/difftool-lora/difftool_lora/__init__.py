"""difftool-lora: the `lora` adapter (peft LoRA on a diffusers model's layers, with DoRA and
rsLoRA as options) and its relatives from peft as adapters of their own: `loha`, `lokr`, `oft`."""

import difftool

__version__ = "0.1.0"


@difftool.hookimpl
def register_adapters(register):
    register("lora", "difftool_lora.adapter:lora",
             "LoRA (peft; DoRA, rsLoRA) on the attention projections, optionally the convolutions and the text encoders")
    register("loha", "difftool_lora.variants:loha",
             "LoHa (peft): a Hadamard product of two low-rank pairs, on the same layers as lora")
    register("lokr", "difftool_lora.variants:lokr",
             "LoKr (peft): a Kronecker product of a small and a low-rank factor, on the same layers as lora")
    register("oft", "difftool_lora.variants:oft",
             "OFT (peft): a block-diagonal orthogonal rotation of the attention projections' inputs")
