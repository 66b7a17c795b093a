// Torch binding of the CUDA kernels (ms_deform_attn_cuda_kernel.cu): checks, allocation, dtype casts.
// Nothing here reads device memory, so a call never synchronises and can be captured in a CUDA graph.
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace bev3d {
namespace {

MsdaDtype msda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return MsdaDtype::kFloat64;
    case at::kFloat:
      return MsdaDtype::kFloat32;
    case at::kHalf:
      return MsdaDtype::kFloat16;
    case at::kBFloat16:
      return MsdaDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "the CUDA ms_deform_attn kernel supports float16/bfloat16/float32/float64, got ", t);
  }
}

// Sampling coordinates and accumulation: float64 for float64 inputs, float32 otherwise.
at::ScalarType acc_dtype(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// cudaGetLastError also returns an error left by an earlier, unrelated call or kernel.
void check_launch(const char* err, const char* what) {
  TORCH_CHECK(err == nullptr, "ms_deform_attn CUDA ", what, " failed: ", err,
              " (an asynchronous error of an earlier kernel can surface here too: rerun with "
              "CUDA_LAUNCH_BLOCKING=1 to find the kernel that failed)");
}

void check_cuda(const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(value.is_cuda(), "value must be a CUDA tensor");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() ||
                  sampling_locations.scalar_type() == acc_dtype(value),
              "sampling_locations must have value's dtype or float32");
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const MsdaSizes n = check_msda_inputs(value_, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights);
  check_cuda(value_, sampling_locations);
  const c10::cuda::CUDAGuard guard(value_.device());
  const at::Tensor value = value_.contiguous(), shapes = spatial_shapes.contiguous(),
                   starts = level_start_index.contiguous(),
                   loc = sampling_locations.to(acc_dtype(value_)).contiguous(),
                   attn = attention_weights.contiguous();
  at::Tensor out = at::empty({n.B, n.Q, n.M * n.D}, value.options());  // every element is written
  const char* err = msda_forward_cuda(msda_dtype(value.scalar_type()), value.data_ptr(), shapes.data_ptr<int64_t>(),
                                      starts.data_ptr<int64_t>(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(), n,
                                      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value_, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool compute_grad_value) {
  const MsdaSizes n = check_msda_inputs(value_, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights);
  check_cuda(value_, sampling_locations);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({n.B, n.Q, n.M * n.D}) &&
                  grad_output.scalar_type() == value_.scalar_type() && grad_output.device() == value_.device(),
              "grad_output must have shape (B, Q, M*D), value's dtype and device, got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value_.device());
  const at::ScalarType acc = acc_dtype(value_);
  const at::Tensor grad_out = grad_output.contiguous(), value = value_.contiguous(),
                   shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous(),
                   loc = sampling_locations.to(acc).contiguous(), attn = attention_weights.contiguous();
  // grad_value is accumulated with atomics, so it starts at zero and in float32 (float64) precision,
  // and the order of the additions varies from run to run.
  at::Tensor grad_value;
  if (compute_grad_value) {
    at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda (grad of value)");
    grad_value = at::zeros(value.sizes(), value.options().dtype(acc));
  }
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty_like(attn);
  const char* err = msda_backward_cuda(
      msda_dtype(value.scalar_type()), grad_out.data_ptr(), value.data_ptr(), shapes.data_ptr<int64_t>(),
      starts.data_ptr<int64_t>(), loc.data_ptr(), attn.data_ptr(), compute_grad_value ? grad_value.data_ptr() : nullptr,
      grad_loc.data_ptr(), grad_attn.data_ptr(), n, c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "backward");
  return {compute_grad_value ? grad_value.to(value.scalar_type()) : at::empty({0}, value.options()),
          grad_loc.to(sampling_locations.scalar_type()), grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(bev3d, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace bev3d
