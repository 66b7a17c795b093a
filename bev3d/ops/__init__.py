"""Operators: multi-scale deformable attention (CPU C++ / CUDA kernels, PyTorch reference), RoIAlign."""

from bev3d.ops.deform_attn import ms_deform_attn, ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
