"""PETR's ray-angle cross-attention prior as a low-rank attention bias that keeps SDPA's fused kernels."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from bev3d.models.transformer.attention import MultiheadAttention, merge_masks


class LowRankBias(NamedTuple):
    """An additive attention bias in factored form, bias[b, m, l, s] = query[b, m, l] . key[b, s].

    LowRankBiasAttention appends the factors to its queries and keys, so the bias enters SDPA's q.k product
    and the fused kernels run: a dense (B, M, L, S) float mask that needs a gradient forces the math path,
    which materialises the attention matrix (2x slower per call on CPU for PETR's ray bias, whose rank is
    3 per camera).
    """

    query: torch.Tensor  # (B, M, L, r)
    key: torch.Tensor  # (B, S, r)

    def dense(self):
        """(B, M, L, S) the bias itself."""
        return self.query @ self.key[:, None].transpose(-1, -2)


class LowRankBiasAttention(MultiheadAttention):
    """MultiheadAttention whose attn_mask may also be a LowRankBias."""

    def attend(self, q, k, v, attn_mask, key_padding_mask, dropout):
        if not isinstance(attn_mask, LowRankBias):
            return super().attend(q, k, v, attn_mask, key_padding_mask, dropout)
        return low_rank_biased_attention(q, k, v, attn_mask, key_padding_mask, dropout)


def low_rank_biased_attention(q, k, v, bias, key_padding_mask, dropout):
    """q (B, M, L, E), k and v (B, M, S, E): softmax(q.k / sqrt(E) + bias) v as one SDPA call on
    [q, sqrt(E) bias.query] and [k, bias.key], with v zero-padded to the same width (the fused CPU
    kernels want equal head dims). In float32: under bf16 autocast the bias (hundreds for a narrow
    ray-bias head) would lose whole units."""
    E = q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        B, M, S, _ = k.shape
        extra_q = bias.query.float() * E ** 0.5
        extra_k = bias.key.float()[:, None].expand(B, M, S, -1)
        q = torch.cat([q.float(), extra_q.expand(B, M, -1, -1)], -1)
        k = torch.cat([k.float(), extra_k], -1)
        v = F.pad(v.float(), (0, extra_q.shape[-1]))
        mask = merge_masks(None, key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=E ** -0.5)
    return out[..., :E]
