// Shape/dtype/device checks shared by the CPU and CUDA bindings of bev3d::ms_deform_attn.
// The Python wrapper (bev3d/ops/deform_attn.py) raises ValueError before these fire; these guard
// direct torch.ops.bev3d.* callers and compiled graphs, since the kernels index memory with the shapes.
#pragma once

#include <ATen/ATen.h>

#include "ms_deform_attn_kernel.h"

namespace bev3d {

// The CUDA kernel keeps H in an int next to a 4-bit corner mask; both kernels share the limit.
constexpr int64_t kMaxLevelSide = int64_t(1) << 27;

// spatial_shapes (L, 2) and level_start_index (L,) against S, read on the host. Only for CPU tensors:
// reading GPU tensors here would synchronise with the device, so the CUDA kernel checks them itself.
inline void check_levels_on_host(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    const int64_t H = hw[2 * l], W = hw[2 * l + 1];
    TORCH_CHECK(H >= 1 && W >= 1 && H < kMaxLevelSide && W < kMaxLevelSide, "spatial_shapes level ", l,
                " is (H, W) = (", H, ", ", W, "); each side must be in [1, 2^27)");
    TORCH_CHECK(start[l] == total, "level_start_index must be the exclusive cumulative sum of H*W: level ", l,
                " starts at ", start[l], ", expected ", total);
    total += H * W;
  }
  TORCH_CHECK(total == S, "spatial_shapes cover sum(H*W) = ", total, " positions but value has S = ", S,
              " (value must have shape (B, sum(H*W), M, D))");
}

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
  if (spatial_shapes.is_cpu()) check_levels_on_host(spatial_shapes, level_start_index, S);
  return {B, S, M, D, Q, L, P};
}

}  // namespace bev3d
