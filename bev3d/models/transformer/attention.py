"""Multi-head attention on `F.scaled_dot_product_attention` (flash / memory-efficient kernels when available)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with DETR's positional convention.

    Positions are added to queries and keys (never to values): q = query + query_pos,
    k = key + key_pos, v = value. key_padding_mask (B, S) is True at padded keys; attn_mask is
    (L, S), (B*, L, S) or per head (B*, M, L, S), boolean (True = may attend) or additive float.
    A subclass may override `attend` to take other kinds of attention bias.
    """

    def __init__(self, embed_dims, num_heads, dropout=0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.embed_dims, self.num_heads, self.dropout = embed_dims, num_heads, dropout
        self.q_proj = nn.Linear(embed_dims, embed_dims)
        self.k_proj = nn.Linear(embed_dims, embed_dims)
        self.v_proj = nn.Linear(embed_dims, embed_dims)
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x):  # (B, L, C) -> (B, M, L, C/M)
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, -1).transpose(1, 2)

    def forward(self, query, key=None, value=None, query_pos=None, key_pos=None, key_padding_mask=None,
                attn_mask=None):
        """query (B, L, C), key/value (B, S, C) (default: the query, i.e. self-attention) -> (B, L, C)."""
        key = query if key is None else key
        value = key if value is None else value
        if key_pos is None and key is query:
            key_pos = query_pos
        q = self._heads(self.q_proj(query if query_pos is None else query + query_pos))
        k = self._heads(self.k_proj(key if key_pos is None else key + key_pos))
        v = self._heads(self.v_proj(value))
        out = self.attend(q, k, v, attn_mask, key_padding_mask, self.dropout if self.training else 0.0)
        B, _, L, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dims))

    def attend(self, q, k, v, attn_mask, key_padding_mask, dropout):
        """q (B, M, L, E), k and v (B, M, S, E) -> softmax(q.k / sqrt(E) + masks) v, (B, M, L, E)."""
        mask = merge_masks(attn_mask, key_padding_mask, q.dtype)  # broadcastable to (B, M, L, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def merge_masks(attn_mask, key_padding_mask, dtype):
    """One additive float mask (or None) from an attention mask and a key padding mask."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))
        mask = attn_mask.unsqueeze(1) if attn_mask.dim() == 3 else attn_mask
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
        pad = pad.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask
