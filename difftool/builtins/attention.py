"""Built-in attention processor factories that need a choice made at build time."""


def default():
    """diffusers' default: the SDPA processor where torch provides it, else the vanilla one."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if hasattr(F, "scaled_dot_product_attention") else AttnProcessor()
