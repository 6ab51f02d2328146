"""Low-rank adaptation (LoRA) of the q and v projections of a fused ``qkv`` linear layer.

SynFoC fine-tunes the foundation model's image encoder only through LoRA of rank ``r`` on the query
and value projections of every attention block; the key projection and everything else in the encoder
stay frozen. Both encoders used here (SAM's ViT and LiteMedSAM's TinyViT) compute q, k and v with one
fused ``nn.Linear``; :class:`LoRAQKV` replaces that layer, keeps its frozen weight and bias under the
same parameter names (``qkv.weight``, ``qkv.bias``) so base checkpoints still address them, and adds

    q += x A_q^T B_q^T,   v += x A_v^T B_v^T

with ``A`` Kaiming-uniform (a = sqrt(5)), ``B`` zero (so the adapted model starts equal to the base
model), no scaling and no dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRAQKV",
    "add_lora_to_qkv",
    "lora_parameters",
    "sam_vit_qv_indices",
    "tinyvit_qv_indices",
]


def sam_vit_qv_indices(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows of SAM ViT's fused ``qkv`` (``dim -> 3*dim``) that form q and v.

    SAM reshapes the qkv output as ``(..., 3, num_heads, head_dim)``: the first ``dim`` outputs are q
    for all heads, the next ``dim`` are k, the last ``dim`` are v.
    """
    return torch.arange(0, dim), torch.arange(2 * dim, 3 * dim)


def tinyvit_qv_indices(num_heads: int, key_dim: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows of TinyViT's fused ``qkv`` that form q and v.

    TinyViT lays the qkv output out head by head: it views it as ``(..., num_heads, 2*key_dim +
    value_dim)`` and splits the last axis into ``[key_dim, key_dim, value_dim]``. So head ``h`` owns
    the contiguous chunk ``h*(2*key_dim+value_dim) + [0, 2*key_dim+value_dim)`` whose first
    ``key_dim`` rows are its q and whose last ``value_dim`` rows are its v (interleaved per head,
    unlike SAM's q-block/k-block/v-block layout).
    """
    chunk = 2 * key_dim + value_dim
    starts = torch.arange(num_heads) * chunk
    q_index = (starts[:, None] + torch.arange(key_dim)[None, :]).reshape(-1)
    v_index = (starts[:, None] + 2 * key_dim + torch.arange(value_dim)[None, :]).reshape(-1)
    return q_index, v_index


class LoRAQKV(nn.Module):
    """A frozen fused ``qkv`` linear layer with rank-``r`` updates on its q and v output rows.

    Args:
        qkv: the pretrained fused linear layer; its weight and bias are taken over (same parameter
            names) and frozen.
        q_index: output rows of ``qkv`` that are the query projection (all heads).
        v_index: output rows of ``qkv`` that are the value projection (all heads).
        rank: LoRA rank ``r`` (> 0).
    """

    def __init__(self, qkv: nn.Linear, q_index: torch.Tensor, v_index: torch.Tensor, rank: int) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features = qkv.in_features
        self.out_features = qkv.out_features
        self.rank = rank
        self.weight = qkv.weight
        self.bias = qkv.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = qkv.weight.device, qkv.weight.dtype
        self.lora_a_q = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b_q = nn.Parameter(torch.zeros(len(q_index), rank, device=device, dtype=dtype))
        self.lora_a_v = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b_v = nn.Parameter(torch.zeros(len(v_index), rank, device=device, dtype=dtype))
        # Same initialisation as nn.Linear's weight: Kaiming-uniform with a = sqrt(5).
        nn.init.kaiming_uniform_(self.lora_a_q, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_a_v, a=math.sqrt(5))
        self.register_buffer("q_index", q_index.to(device=device, dtype=torch.long), persistent=False)
        self.register_buffer("v_index", v_index.to(device=device, dtype=torch.long), persistent=False)

    def delta_up(self) -> torch.Tensor:
        """The ``(out_features, 2r)`` up-projection: ``B_q`` on the q rows, ``B_v`` on the v rows, 0 on k."""
        up = self.lora_b_q.new_zeros(self.out_features, 2 * self.rank)
        up = up.index_copy(0, self.q_index, F.pad(self.lora_b_q, (0, self.rank)))
        return up.index_copy(0, self.v_index, F.pad(self.lora_b_v, (self.rank, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = torch.cat([self.lora_a_q, self.lora_a_v], dim=0)  # (2r, in)
        up = self.delta_up()  # (out, 2r)
        lora_trains = torch.is_grad_enabled() and self.lora_a_q.requires_grad
        if not lora_trains:
            # Inference (e.g. the EMA teacher): fold the update into the weight, one matmul per token.
            return F.linear(x, torch.addmm(self.weight, up, down), self.bias)
        # Training: keep the low-rank path separate so backward never forms a full-size weight
        # gradient; the frozen base matmul only propagates the input gradient. The up-projection is
        # accumulated into the base output in place (addmm_; F.linear saves its input, not its output),
        # sparing a pass over the (tokens, 3*dim) output and a fresh buffer of its size. It works on
        # the 2-D output itself, not on a view of it: an in-place op on a view makes autograd copy
        # the whole gradient three times in backward (CopySlices).
        x2 = x.reshape(-1, self.in_features)
        base = F.linear(x2, self.weight, self.bias)
        base.addmm_(F.linear(x2, down), up.t().to(base.dtype))
        return base.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} (q, v)"


def add_lora_to_qkv(
    module: nn.Module,
    attribute: str,
    q_index: torch.Tensor,
    v_index: torch.Tensor,
    rank: int,
) -> LoRAQKV:
    """Replace ``module.<attribute>`` (a fused qkv ``nn.Linear``) by a :class:`LoRAQKV` wrapper."""
    qkv = getattr(module, attribute)
    if not isinstance(qkv, nn.Linear):
        raise TypeError(f"expected nn.Linear at {attribute}, found {type(qkv).__name__}")
    wrapped = LoRAQKV(qkv, q_index, v_index, rank)
    setattr(module, attribute, wrapped)
    return wrapped


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(name, parameter)`` of every LoRA factor in ``model``."""
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            yield name, parameter
