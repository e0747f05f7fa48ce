"""Attention processors for diffusers' `Attention` layers (UNet2DModel's, UNet2DConditionModel's)."""

from __future__ import annotations

import torch


class ExplicitAttention:
    """The attention step by step: project to queries, keys and values; weights =
    softmax(Q K^T * scale) in float32; weights V; project out. The same maths as diffusers'
    default (SDPA) processor, written so that each piece can be read, changed or observed."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial_shape is not None:  # (batch, channels, h, w) -> (batch, h*w, channels)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states

        query = split_heads(attn.to_q(hidden_states), attn.heads)
        key = split_heads(attn.to_k(context), attn.heads)
        value = split_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)

        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            batch, length = query.shape[0], context.shape[1]
            mask = attn.prepare_attention_mask(attention_mask, length, batch)
            scores = scores + mask.view(batch, attn.heads, -1, length).float()
        weights = scores.softmax(dim=-1)
        self.observe(weights)
        out = weights.to(value.dtype) @ value  # (batch, heads, queries, head_dim)

        out = out.transpose(1, 2).flatten(2)  # heads back into channels
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if spatial_shape is not None:
            out = out.transpose(1, 2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def observe(self, weights: torch.Tensor) -> None:
        """Called with the attention weights (batch, heads, queries, keys); override to use them."""


class AttentionMaps(ExplicitAttention):
    """Explicit attention that, inside `difftool_attention.maps.capture`, keeps the mean over
    calls of its head-averaged weights (batch, queries, keys). Outside it, it records nothing.

    `timestep`: the noise level at which each sample grid's maps are taken in training
    (default: a tenth of the noise scheduler's train timesteps).
    """

    def __init__(self, timestep: int | None = None):
        self.timestep = timestep
        self.recording = False
        self.total, self.calls = None, 0

    def observe(self, weights: torch.Tensor) -> None:
        if self.recording:
            mean = weights.detach().float().mean(dim=1)
            self.total = mean if self.total is None else self.total + mean
            self.calls += 1

    def reset(self) -> None:
        self.total, self.calls = None, 0

    @property
    def map(self) -> torch.Tensor | None:
        """The recorded attention weights (batch, queries, keys), or None."""
        return None if self.total is None else self.total / self.calls


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)
