// Shape/dtype/device checks shared by the CPU and CUDA bindings of bev3d::ms_deform_attn.
// The Python wrapper (bev3d/ops/deform_attn.py) raises ValueError before these fire; these guard
// direct torch.ops.bev3d.* callers, since the kernels trust the shapes to index memory.
#pragma once

#include <ATen/ATen.h>

#include "ms_deform_attn_kernel.h"

namespace bev3d {

inline MsdaSizes check_msda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must have shape (B, S, M, D), got ", value.sizes());
  const int64_t B = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "level_start_index must have shape (L,), got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == B && sampling_locations.size(2) == M &&
                  sampling_locations.size(3) == L && sampling_locations.size(5) == 2,
              "sampling_locations must have shape (B, Q, M, L, P, 2), got ", sampling_locations.sizes());
  const int64_t Q = sampling_locations.size(1), P = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({B, Q, M, L, P}),
              "attention_weights must have shape (B, Q, M, L, P), got ", attention_weights.sizes());
  TORCH_CHECK(attention_weights.scalar_type() == value.scalar_type(),
              "attention_weights must have value's dtype");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "all inputs must be on value's device ", value.device());
  }
  return {B, S, M, D, Q, L, P};
}

}  // namespace bev3d
