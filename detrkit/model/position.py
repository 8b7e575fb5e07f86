"""Position embeddings for the flattened feature map."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine embedding that respects the padding mask.

    Each image's valid region spans (0, 2*pi] on both axes whatever its padding, so a padded image
    sees the same positions as the unpadded one. Output channels: y in [0, d/2), x in [d/2, d).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self._cache: dict[tuple, Tensor] = {}

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B,h,w] bool, True on padding -> pos [B, 2*num_pos_feats, h, w] float32."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not mask.any():
            # No padding: every image has the same embedding, so compute it once per size.
            key = (mask.shape[-2], mask.shape[-1], mask.device)
            pos = self._cache.get(key)
            if pos is None:
                pos = self._embed(mask[:1])
                if len(self._cache) > 32:
                    self._cache.clear()
                self._cache[key] = pos
            return pos.expand(mask.shape[0], -1, -1, -1)
        return self._embed(mask)

    def _embed(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * self.scale
        x = x / (x[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).contiguous()


class PositionEmbeddingLearned(nn.Module):
    """Two learned tables (rows, columns) of 50 entries; ignores the mask, as published."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B,h,w] -> pos [B, 2*num_pos_feats, h, w]; x features first, then y."""
        b, h, w = mask.shape
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(
                f"learned position embedding covers at most {self.row_embed.num_embeddings} rows/cols, "
                f"feature map is {h}x{w}"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # [w, f]
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # [h, f]
        pos = torch.cat((x_emb[None].expand(h, -1, -1), y_emb[:, None].expand(-1, w, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)


def build_position_embedding(kind: str, hidden_dim: int) -> nn.Module:
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position embedding {kind!r}")
