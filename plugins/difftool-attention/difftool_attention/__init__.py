"""difftool-attention: the `explicit` and `attention-maps` attention processors.

In Python, `difftool_attention.maps.capture(model)` records the maps of any forward pass.
"""

import difftool

__version__ = "0.1.0"


@difftool.hookimpl
def register_attention_processors(register):
    register("explicit", "difftool_attention.processors:ExplicitAttention",
             "softmax(QK^T * scale) V written out in PyTorch: a readable base to change attention")
    register("attention-maps", "difftool_attention.processors:AttentionMaps",
             "explicit attention that can record its maps; each sample grid gets attention-map images")


@difftool.hookimpl
def on_samples(state, images):
    from difftool_attention.maps import save_sample_maps

    save_sample_maps(state, images)
