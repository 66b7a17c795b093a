"""Python side of the compiled bev3d::ms_deform_attn op: its fake (meta) and autograd implementations.

build.load_extension calls register_op_impls once, right after loading the library that defines the
op schemas (csrc/ms_deform_attn_cpu.cpp). This module imports no other bev3d module.
"""

import torch


def register_op_impls():
    @torch.library.register_fake("bev3d::ms_deform_attn")
    def _fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, M, D = value.shape
        return value.new_empty((B, sampling_locations.shape[1], M * D))

    @torch.library.register_fake("bev3d::ms_deform_attn_backward")
    def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, compute_grad_value=True):
        grad_value = torch.empty_like(value) if compute_grad_value else value.new_empty((0,))
        return grad_value, torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        # Without grad of value the backward skips its scatter (and on CUDA its float32 buffer and atomics).
        need_value = ctx.needs_input_grad[0]
        grad_value, grad_loc, grad_attn = torch.ops.bev3d.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            need_value)
        return grad_value if need_value else None, None, None, grad_loc, grad_attn

    torch.library.register_autograd("bev3d::ms_deform_attn", backward, setup_context=setup_context)
