"""Pre-norm Transformer encoder over the 8 rows of a digit: a LayerNorm model.

Each image row (8 pixels) is one token. Pre-norm (LayerNorm before attention and before the
MLP, as in GPT-2 and ViT) keeps the residual path an identity, which trains stably without a
learning-rate warm-up. The attention is written out with ``scaled_dot_product_attention``
instead of ``nn.TransformerEncoderLayer``, whose eval-mode fast path is a fused kernel that
hides the LayerNorms from the exported graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.data import IMAGE_SIDE, NUM_CLASSES


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class PreNormBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class RowTransformer(nn.Module):
    """Input [N, 8, 8] (rows x pixels) in [0, 1]; output [N, 10] logits."""

    def __init__(
        self, dim: int = 64, depth: int = 2, heads: int = 4, ff: int = 128, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(IMAGE_SIDE, dim)
        self.position = nn.Parameter(torch.zeros(1, IMAGE_SIDE, dim))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*(PreNormBlock(dim, heads, ff, dropout) for _ in range(depth)))
        # Pre-norm blocks leave the residual stream un-normalized: one final LayerNorm.
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.embed(image) + self.position))
        # Mean over the tokens written as a sum of slices: the same function, but exported as
        # element-wise Adds, which onnxruntime computes identically for every batch size
        # (its ReduceMean takes another path at batch 1, which would make a served row's
        # result depend on whether it was batched, at the 1e-7 level).
        pooled = x[:, 0]
        for t in range(1, x.shape[1]):
            pooled = pooled + x[:, t]
        return self.head(pooled / x.shape[1])
