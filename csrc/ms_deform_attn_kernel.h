// Torch-free, CUDA-free interface of the ms_deform_attn kernels: sizes and the CUDA launchers.
// The launchers take raw pointers so that ms_deform_attn_cuda_kernel.cu compiles with plain nvcc.
#pragma once

#include <cstdint>

namespace bev3d {

// value (B, S, M, D); sampling_locations (B, Q, M, L, P, 2); attention_weights (B, Q, M, L, P).
struct MsdaSizes {
  int64_t B, S, M, D, Q, L, P;
};

enum class MsdaDtype { kFloat64, kFloat32, kFloat16, kBFloat16 };

// In the launchers "acc" is float64 for kFloat64 and float32 otherwise. Pointers must be
// contiguous and device-resident; spatial_shapes (L, 2) and level_start_index (L,) are int64 and are
// checked against S on the device (a device-side assertion when they disagree).
// Each returns nullptr on success, else the CUDA error string of the launch.

// out (B, Q, M*D) in dtype; every element is written, so it needs no initialisation.
// sampling_locations are acc; value, attention_weights and out are dtype.
const char* msda_forward_cuda(MsdaDtype dtype, const void* value, const int64_t* spatial_shapes,
                              const int64_t* level_start_index, const void* sampling_locations,
                              const void* attention_weights, void* out, MsdaSizes n, void* stream);

// grad_value_acc (B, S, M, D) in acc must be zero-filled (it is accumulated with atomics), or
// nullptr when value needs no gradient; grad_locations (acc) and grad_weights (dtype) are fully written.
const char* msda_backward_cuda(MsdaDtype dtype, const void* grad_output, const void* value,
                               const int64_t* spatial_shapes, const int64_t* level_start_index,
                               const void* sampling_locations, const void* attention_weights, void* grad_value_acc,
                               void* grad_locations, void* grad_weights, MsdaSizes n, void* stream);

}  // namespace bev3d
