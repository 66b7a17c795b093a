"""Row-Column Decoupled Attention (Anchor DETR, Wang et al. 2022).

Standard attention of Q queries over an H x W map stores a (Q, H*W) weight per head. RCDA replaces it by two 1D
attentions: A_x = softmax(Q_x K_x^T / sqrt(d)) over the W columns, with K_x the keys averaged over the rows,
and A_y = softmax(Q_y K_y^T / sqrt(d)) over the H rows, with K_y averaged over the columns; the output is
sum_h A_y[h] sum_w A_x[w] V[h, w]. Memory per head is Q*(H + W) for the weights and Q*H*C for the
intermediate sum instead of Q*H*W.
"""

import torch.nn as nn
import torch.nn.functional as F


class RowColumnAttention(nn.Module):
    """query_x / query_y (B, Q, C) carry x / y positions, key_x / key_y (B, H, W, C) likewise, value (B, H, W, C);
    key_padding_mask (B, H, W) True at padding (rows and columns of padding are masked) -> (B, Q, C)."""

    def __init__(self, embed_dims, num_heads, dropout=0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_x_proj, self.q_y_proj = nn.Linear(embed_dims, embed_dims), nn.Linear(embed_dims, embed_dims)
        self.k_x_proj, self.k_y_proj = nn.Linear(embed_dims, embed_dims), nn.Linear(embed_dims, embed_dims)
        self.v_proj, self.out_proj = nn.Linear(embed_dims, embed_dims), nn.Linear(embed_dims, embed_dims)
        for lin in (self.q_x_proj, self.q_y_proj, self.k_x_proj, self.k_y_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x):  # (B, N, C) -> (B, M, N, C / M)
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def _weights(self, q, k, padding):
        """q (B, M, Q, E), k (B, M, N, E), padding (B, N) -> softmax weights (B, M, Q, N)."""
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if padding is not None:
            logits = logits.masked_fill(padding[:, None, None], float("-inf"))
        return F.dropout(logits.softmax(-1), self.dropout, self.training)

    def forward(self, query_x, query_y, key_x, key_y, value, key_padding_mask=None):
        B, Q, C = query_x.shape
        _, H, W, _ = value.shape
        # the projection is affine, so averaging before it equals the paper's pooling of projected keys
        k_x = self._heads(self.k_x_proj(key_x.mean(1)))  # (B, M, W, E): one key per column
        k_y = self._heads(self.k_y_proj(key_y.mean(2)))  # (B, M, H, E): one key per row
        pad_x = None if key_padding_mask is None else key_padding_mask[:, 0, :]  # padded columns (B, W)
        pad_y = None if key_padding_mask is None else key_padding_mask[:, :, 0]  # padded rows (B, H)
        a_x = self._weights(self._heads(self.q_x_proj(query_x)), k_x, pad_x)  # (B, M, Q, W)
        a_y = self._weights(self._heads(self.q_y_proj(query_y)), k_y, pad_y)  # (B, M, Q, H)
        v = self.v_proj(value).view(B, H, W, self.num_heads, -1).permute(0, 3, 1, 2, 4)  # (B, M, H, W, E)
        M, E = v.shape[1], v.shape[-1]
        # sum over the longer side first: the intermediate (B, M, Q, shorter side, E) is the smaller one
        if H <= W:
            z = (a_x @ v.transpose(2, 3).reshape(B, M, W, H * E)).view(B, M, Q, H, E)
            out = (a_y[..., None, :] @ z).squeeze(-2)  # (B, M, Q, E)
        else:
            z = (a_y @ v.reshape(B, M, H, W * E)).view(B, M, Q, W, E)
            out = (a_x[..., None, :] @ z).squeeze(-2)
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, C))
