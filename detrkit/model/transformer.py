"""The DETR encoder-decoder transformer, batch-first.

Parameter names and layouts follow the released checkpoints (packed q/k/v ``in_proj_weight``), so
the authors' weights load without reshaping. Attention runs through
``scaled_dot_product_attention`` unless the caller asks for the attention weights (in float32 when
training on a CPU under bf16 autocast).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MultiheadAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters, batch-first, fused kernel.

    query [B,Lq,d], key [B,Lk,d], value [B,Lk,d], key_padding_mask [B,Lk] (True = ignore),
    attn_mask [Lq,Lk] bool (True = query i ignores key j)
    -> (output [B,Lq,d], weights [B,heads,Lq,Lk] or None). Weights are exactly 0 on ignored keys.
    """

    def __init__(self, dim: int, nheads: int, dropout: float = 0.0):
        super().__init__()
        self.dim, self.nheads, self.dropout = dim, nheads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.nheads, self.dim // self.nheads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        d = self.dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one matmul for q and k
            q, k = F.linear(query, w[: 2 * d], b[: 2 * d]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:d], b[:d])
            k = F.linear(key, w[d: 2 * d], b[d: 2 * d])
        v = F.linear(value, w[2 * d:], b[2 * d:])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        p = self.dropout if self.training else 0.0
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            keep = ~attn_mask if keep is None else keep & ~attn_mask
        weights = None
        if need_weights:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scale the smaller operand
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p, self.training) @ v
        elif q.device.type == "cpu" and torch.is_grad_enabled() and q.dtype != torch.float32:
            # CPU training under bf16 autocast: the fused kernel's backward is several times slower in
            # bf16 than in float32 (AMX Xeon, batch 32, 8 heads: 48 against 7 ms at 100 tokens), and
            # float32's beats explicit matmuls at every length (2.4x at 400 tokens, the stride-16 maps)
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep,
                                                     dropout_p=p).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(out), weights if need_weights else None


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, dim_ff: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d, nheads, dropout)
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """src, pos [B,N,d]; key_padding_mask [B,N] -> ([B,N,d], weights [B,heads,N,N] | None)."""
        if self.pre_norm:
            x = self.norm1(src)
            qk = x + pos
            attn, w = self.self_attn(qk, qk, x, key_padding_mask, need_weights)
            src = src + self.dropout(attn)
            return src + self._ffn(self.norm2(src)), w
        qk = src + pos
        attn, w = self.self_attn(qk, qk, src, key_padding_mask, need_weights)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self._ffn(src)), w


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, dim_ff: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d, nheads, dropout)
        self.multihead_attn = MultiheadAttention(d, nheads, dropout)
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor | None,
                memory_key_padding_mask: Tensor | None, need_weights: bool = False,
                self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """tgt, query_pos [B,Q,d] (None: queries were given at the input); memory, pos [B,N,d];
        self_attn_mask [Q,Q] (True: query i ignores query j) -> ([B,Q,d], cross weights [B,heads,Q,N] | None)."""
        mem_k = memory + pos

        if self.pre_norm:
            x = self.norm1(tgt)
            qk = _with_pos(x, query_pos)
            tgt = tgt + self.dropout(self.self_attn(qk, qk, x, attn_mask=self_attn_mask)[0])
            x = self.norm2(tgt)
            attn, w = self.multihead_attn(_with_pos(x, query_pos), mem_k, memory, memory_key_padding_mask, need_weights)
            tgt = tgt + self.dropout(attn)
            return tgt + self._ffn(self.norm3(tgt)), w
        qk = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt, attn_mask=self_attn_mask)[0]))
        attn, w = self.multihead_attn(_with_pos(tgt, query_pos), mem_k, memory, memory_key_padding_mask, need_weights)
        tgt = self.norm2(tgt + self.dropout(attn))
        return self.norm3(tgt + self._ffn(tgt)), w


class Encoder(nn.Module):
    def __init__(self, num_layers: int, d: int, nheads: int, dim_ff: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, nheads, dim_ff, dropout, pre_norm) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d) if pre_norm else None  # post-norm has no final encoder norm

    def forward(self, src, pos, key_padding_mask, need_weights=False):
        weights = []
        for layer in self.layers:
            src, w = layer(src, pos, key_padding_mask, need_weights)
            weights.append(w)
        if self.norm is not None:
            src = self.norm(src)
        return src, weights


class Decoder(nn.Module):
    def __init__(self, num_layers: int, d: int, nheads: int, dim_ff: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, nheads, dim_ff, dropout, pre_norm) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d)  # shared, applied to every layer's output

    def forward(self, tgt, memory, pos, query_pos, key_padding_mask, need_weights=False, self_attn_mask=None):
        outputs, weights = [], []
        for layer in self.layers:
            tgt, w = layer(tgt, memory, pos, query_pos, key_padding_mask, need_weights, self_attn_mask)
            outputs.append(self.norm(tgt))
            weights.append(w)
        return torch.stack(outputs), weights


class Transformer(nn.Module):
    """The encoder and the decoder.

    encode(src [B,N,d], pos [B,N,d], key_mask [B,N] | None) -> (memory [B,N,d], weights [Le,B,heads,N,N] | None)
    decode(memory, pos, key_mask, queries [B,Q,d], self_attn_mask [Q,Q] | None)
      -> (hs [L,B,Q,d] every decoder layer after the shared norm, cross weights [L,B,heads,Q,N] | None)

    queries_at: "attention" (released DETR: the decoder starts from zeros and the object queries are
    added to queries and keys in every attention) or "input" (the paper's Table 3 variant: the object
    queries are the decoder's input and are not added again). Fed at the input, each query carries its
    identity in the values too, so the slots differ from the first step instead of only through where
    they attend -- which is what lets a from-scratch model leave the early "every query alike" phase.
    """

    def __init__(self, d: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False,
                 queries_at: str = "attention"):
        super().__init__()
        if queries_at not in ("attention", "input"):
            raise ValueError(f"queries_at must be 'attention' or 'input', got {queries_at!r}")
        self.queries_at = queries_at
        self.encoder = Encoder(enc_layers, d, nheads, dim_feedforward, dropout, pre_norm)
        self.decoder = Decoder(dec_layers, d, nheads, dim_feedforward, dropout, pre_norm)
        self.d_model, self.nhead = d, nheads
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, pos: Tensor, key_mask: Tensor | None,
               need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        memory, weights = self.encoder(src, pos, key_mask, need_weights)
        return memory, torch.stack(weights) if need_weights else None

    def decode(self, memory: Tensor, pos: Tensor, key_mask: Tensor | None, queries: Tensor,
               self_attn_mask: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.queries_at == "input":
            tgt, query_pos = queries, None
        else:
            tgt, query_pos = torch.zeros_like(queries), queries
        hs, weights = self.decoder(tgt, memory, pos, query_pos, key_mask, need_weights, self_attn_mask)
        return hs, torch.stack(weights) if need_weights else None
