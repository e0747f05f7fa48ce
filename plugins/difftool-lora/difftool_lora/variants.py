"""LoRA's relatives in peft, each its own adapter: LoHa, LoKr and OFT.

LoHa (Hadamard product of two low-rank pairs) and LoKr (Kronecker product) change a layer's
weight by a product of small factors, as LoRA does by B @ A; OFT (orthogonal fine-tuning)
instead rotates the layer's input by a block-diagonal orthogonal matrix, which keeps the angles
between the base weight's rows. Every one of them starts from the base model (their default
initialisation adds nothing), is saved in peft's layout, and is fused by peft's `merge`, which
reproduces the adapted layer exactly for each layer type these factories accept.
"""

from __future__ import annotations

from pathlib import Path

from difftool.adapters import Adapter
from difftool.errors import DifftoolError
from difftool_lora.adapter import ATTENTION, CONVOLUTIONS, WEIGHTS, load_peft, merge_peft, save_peft


def loha(model, r: int = 8, alpha: float | None = None, rank_dropout: float = 0.0, module_dropout: float = 0.0,
         use_effective_conv2d: bool = False, target_modules: list[str] | None = None,
         include_convolutions: bool = False, init_weights: bool = True):
    """Freeze the model and add LoHa of rank `r` to its `target_modules` (default: the
    attention projections; `include_convolutions` adds the ResNet convolutions). The update is
    (B1 A1) * (B2 A2), elementwise, scaled by `alpha / r` (`alpha` defaults to `r`). The other
    keys are peft.LoHaConfig's."""
    from peft import LoHaConfig

    targets = _targets(target_modules, include_convolutions)
    _check(model, "loha", targets)
    return _add(model, "loha", LoHaConfig(
        r=r, alpha=alpha or r, rank_dropout=rank_dropout, module_dropout=module_dropout,
        use_effective_conv2d=use_effective_conv2d, target_modules=targets, init_weights=init_weights))


def lokr(model, r: int = 8, alpha: float | None = None, rank_dropout: float = 0.0, module_dropout: float = 0.0,
         use_effective_conv2d: bool = False, decompose_both: bool = False, decompose_factor: int = -1,
         target_modules: list[str] | None = None, include_convolutions: bool = False,
         init_weights: bool | str = True):
    """Freeze the model and add LoKr to its `target_modules` (default: the attention
    projections; `include_convolutions` adds the ResNet convolutions). The update is the
    Kronecker product W1 (x) W2 of a small factor and a rank-`r` one (`decompose_both`: both
    low-rank; `decompose_factor` picks the split, -1 as square as can be), scaled by `alpha / r`
    (`alpha` defaults to `r`). The other keys are peft.LoKrConfig's."""
    from peft import LoKrConfig

    targets = _targets(target_modules, include_convolutions)
    _check(model, "lokr", targets)
    return _add(model, "lokr", LoKrConfig(
        r=r, alpha=alpha or r, rank_dropout=rank_dropout, module_dropout=module_dropout,
        use_effective_conv2d=use_effective_conv2d, decompose_both=decompose_both,
        decompose_factor=decompose_factor, target_modules=targets, init_weights=init_weights))


def oft(model, r: int = 0, oft_block_size: int | None = None, module_dropout: float = 0.0, coft: bool = False,
        eps: float = 6e-5, block_share: bool = False, target_modules: list[str] | None = None,
        include_convolutions: bool = False, init_weights: bool = True):
    """Freeze the model and add OFT to its `target_modules` (default: the attention
    projections): each layer's input is rotated by a block-diagonal orthogonal matrix of
    `oft_block_size`-square blocks (default 32), or of `r` blocks when `r` is set. `coft`
    keeps each rotation within `eps` of the identity; `block_share` uses one block for all.
    The other keys are peft.OFTConfig's. `include_convolutions` is refused: see _check_oft."""
    from peft import OFTConfig

    if oft_block_size is None:  # peft takes exactly one of the two; the one not set is 0
        oft_block_size = 0 if r else 32
    if r and oft_block_size:
        raise DifftoolError(f"oft takes r (the number of blocks) or oft_block_size (their size), not both "
                            f"(r = {r}, oft_block_size = {oft_block_size}); remove one of them")
    targets = _targets(target_modules, include_convolutions)
    _check(model, "oft", targets)
    return _add(model, "oft", OFTConfig(
        r=r, oft_block_size=oft_block_size, module_dropout=module_dropout, coft=coft, eps=eps,
        block_share=block_share, target_modules=targets, init_weights=init_weights))


# the layer types each variant adapts, and whose merge was checked to give the adapted outputs
SUPPORTED = {"loha": ("Linear", "Conv2d"), "lokr": ("Linear", "Conv2d"),
             "oft": ("Linear", "Conv2d", "Embedding")}


def _targets(target_modules: list[str] | None, include_convolutions: bool) -> list[str]:
    return list(target_modules or ATTENTION) + (CONVOLUTIONS if include_convolutions else [])


def _check(model, name: str, targets: list[str]) -> None:
    """Refuse, before peft touches the model, targets that name no layer, layers of a type
    the variant cannot adapt, a model that already has a peft adapter, and OFT on a
    convolution wider than 1x1."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise DifftoolError(f"the model already has a peft adapter; list one of lora, loha, lokr and oft in "
                            f"[[adapters]] (its target_modules can cover every layer you want)")
    layers = {n: m for n, m in model.named_modules() if n}
    matched = {t: [n for n in layers if n == t or n.endswith(f".{t}")] for t in targets}
    missing = [t for t, names in matched.items() if not names]
    if missing:
        raise DifftoolError(f"{name} target_modules {missing} match no layer of the model; name layers by their "
                            f"last parts, as in {ATTENTION + CONVOLUTIONS}")
    for target, names in matched.items():
        for layer in names:
            kind = type(layers[layer]).__name__
            if kind not in SUPPORTED[name]:
                raise DifftoolError(f"{name} target_modules '{target}' names {layer}, a {kind}; {name} adapts only "
                                    f"{', '.join(SUPPORTED[name])} layers: leave '{target}' out")
            if name == "oft":
                _check_oft(layers[layer], target, layer)


def _check_oft(layer, target: str, name: str) -> None:
    """peft's OFT on a convolution rotates the input's k x k patches and adds the overlapping
    patches back up, so for k > 1 the adapted layer differs from the base one before any
    training (the identity rotation multiplies most inputs by up to k * k), and its merge,
    which rotates the kernel instead, gives yet another layer. 1x1 convolutions are exact."""
    size = getattr(layer, "kernel_size", (1, 1))
    if tuple(size) != (1, 1):
        raise DifftoolError(
            f"oft cannot adapt {name} ('{target}'), a {size[0]}x{size[1]} convolution: peft's OFT changes such a "
            "layer's output before training and cannot be fused into it; adapt the attention projections only "
            "(include_convolutions = false), or use loha or lokr, which adapt convolutions")


def _add(model, name: str, config) -> "PeftAdapter":
    """Freeze the model and inject `config`'s adapter, as the lora factory does."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    try:
        if hasattr(model, "add_adapter"):  # diffusers models with PeftAdapterMixin keep their own bookkeeping
            model.add_adapter(config)
        else:  # e.g. UNet2DModel: the same injection, done by peft directly
            inject_adapter_in_model(config, model)
    except (TypeError, ValueError) as exc:  # a setting peft refuses for some layer
        raise DifftoolError(f"peft could not add {name} to the model: {exc}; change the [[adapters]] keys "
                            "it names") from exc
    return PeftAdapter(name, config)


class PeftAdapter(Adapter):
    """Any peft tuner injected into the model (here LoHa, LoKr or OFT): saved as peft saves it,
    `adapter_config.json` + `adapter_model.safetensors` (the adapter's weights only), loaded
    back, and fused by merging it into the base weights."""

    def __init__(self, name: str, config):
        self.name, self.config = name, config

    def save(self, model, folder: Path) -> None:
        save_peft(model, self.config, folder)

    def load(self, model, folder: Path) -> None:
        if not (folder / WEIGHTS).is_file():
            raise DifftoolError(f"{folder} has no {WEIGHTS}; it was not saved by the {self.name} adapter")
        load_peft(model, folder, f"{self.name} adapter")

    def fuse(self, model):
        # each tuner layer's merge gives the adapted layer's outputs for every layer type the
        # factories accept (OFT on k x k convolutions, where it would not, is refused)
        return merge_peft(model)
