// CUDA kernels of bev3d::ms_deform_attn. Includes no torch header, so plain `nvcc -c` compiles it.
//
// One warp per (b, q, m) (the forward also splits channels into tiles of 32 lanes when D needs more).
// The warp's lanes first prepare one sampling point each (corner row, bilinear fractions, corner
// validity) and broadcast them with __shfl_sync. The warp works as 32/tpg groups of tpg lanes; a
// group samples one point per step and each of its lanes loads VEC channels at once (16-byte loads
// when D and the pointers allow), so a warp samples several points at once for small D.
// Forward: per-group partial outputs are summed with xor shuffles and written once (the output
// needs no memset). Backward: each lane's partial dot products <grad_out, corner value> are reduced
// within its group with xor shuffles, so grad of locations and weights is written once per point
// without atomics; grad_value is scattered with float32 (float64 for double) atomics, vectorised on
// sm_90. Coordinates and accumulation are float32 for float16/bfloat16/float32 inputs. Offsets are
// int64 throughout. The level table is checked on the device, by every point against its own level
// (reading it on the host would synchronise): a mismatch stops the kernel with an assertion.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ms_deform_attn_kernel.h"

namespace bev3d {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // beyond this the grid-stride loops take over
constexpr int64_t kMaxSide = int64_t(1) << 27;    // H shares a shuffled int with the corner mask (H << 4)

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&x)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) x[e] = to_acc(pk.v[e]);
}

template <typename A, int VEC>
__device__ __forceinline__ void atomic_add_scalars(A* dst, const A (&x)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) atomicAdd(dst + e, x[e]);
}

template <typename A, int VEC>
__device__ __forceinline__ void atomic_add_vec(A* dst, const A (&x)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<A, float>::value && VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + e), make_float4(x[e], x[e + 1], x[e + 2], x[e + 3]));
    }
  } else if constexpr (std::is_same<A, float>::value && VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x[0], x[1]));
  } else {
    atomic_add_scalars<A, VEC>(dst, x);
  }
#else
  atomic_add_scalars<A, VEC>(dst, x);
#endif
}

// One sampling point, prepared by one lane and broadcast to the group that samples it.
template <typename A>
struct Point {
  int64_t row0;  // position s of corner (h0, w0); meaningful only for corners flagged valid
  int w;         // level width W
  int h_mask;    // (H << 4) | valid corners, bits 0..3 = (h0,w0), (h0,w0+1), (h0+1,w0), (h0+1,w0+1)
  A lh, lw;      // fractional offsets from (h0, w0)
  A a;           // attention weight
};

// Level l must hold 1 <= H, W < 2^27 and span [starts[l], starts[l + 1]) (up to S for the last level)
// with starts[0] = 0: then every corner row read is inside value. The wrapper and the CPU op check the
// same on the host with the numbers in the message; a direct call on GPU tensors only gets this.
__device__ __forceinline__ void check_level(int l, int64_t H, int64_t W, const int64_t* __restrict__ starts,
                                            const MsdaSizes& n) {
  const int64_t start = starts[l], next = l + 1 < n.L ? starts[l + 1] : n.S;
  const bool ok = H >= 1 && W >= 1 && H < kMaxSide && W < kMaxSide && start >= 0 && start <= next && next <= n.S &&
                  next - start == H * W && (l > 0 || start == 0);
  if (!ok) {
    __assert_fail(
        "ms_deform_attn: spatial_shapes/level_start_index do not match value: each level needs 1 <= H, W < 2^27, "
        "level_start_index must be the exclusive cumulative sum of H*W and sum(H*W) must equal S of value "
        "(B, S, M, D); call it on CPU tensors to get the values named",
        __FILE__, __LINE__, __func__);
  }
}

// Pixel centres sit at (i + 0.5) / W, as in grid_sample(align_corners=False, padding_mode="zeros").
template <typename T, typename A>
__device__ __forceinline__ Point<A> prepare_point(int i, int n_pts, int64_t point0, const int64_t* __restrict__ shapes,
                                                  const int64_t* __restrict__ starts, const A* __restrict__ loc,
                                                  const T* __restrict__ attn, const MsdaSizes& n) {
  Point<A> pt{0, 1, 0, A(0), A(0), A(0)};
  if (i >= n_pts) return pt;
  const int l = i / static_cast<int>(n.P);  // 32-bit: 64-bit division is slow on GPUs
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
  check_level(l, H, W, starts, n);
  const int64_t idx = point0 + i;
  const A x = loc[2 * idx], y = loc[2 * idx + 1];
  const A h_im = y * static_cast<A>(H) - A(0.5);
  const A w_im = x * static_cast<A>(W) - A(0.5);
  pt.w = static_cast<int>(W);
  pt.a = to_acc(attn[idx]);
  // The sample at a non-finite location is NaN, as in grid_sample: NaN fractions carry it through
  // the bilinear weights of both passes while the corner mask stays empty.
  if (!isfinite(x) || !isfinite(y)) pt.lh = pt.lw = A(NAN);
  int mask = 0;
  // Also rejects NaN and keeps the float -> int64 conversion in range.
  if (h_im > A(-1) && w_im > A(-1) && h_im < static_cast<A>(H) && w_im < static_cast<A>(W)) {
    const A hf = floor(h_im), wf = floor(w_im);
    const int64_t h0 = static_cast<int64_t>(hf), w0 = static_cast<int64_t>(wf);
    pt.lh = h_im - hf;
    pt.lw = w_im - wf;
    pt.row0 = starts[l] + h0 * W + w0;
    const bool h0_in = h0 >= 0, h1_in = h0 + 1 < H, w0_in = w0 >= 0, w1_in = w0 + 1 < W;
    mask = (h0_in && w0_in) | ((h0_in && w1_in) << 1) | ((h1_in && w0_in) << 2) | ((h1_in && w1_in) << 3);
  }
  pt.h_mask = static_cast<int>(H << 4) | mask;
  return pt;
}

template <typename A>
__device__ __forceinline__ Point<A> shuffle_point(const Point<A>& p, int src) {
  Point<A> r;
  r.row0 = __shfl_sync(kFullMask, p.row0, src);
  r.w = __shfl_sync(kFullMask, p.w, src);
  r.h_mask = __shfl_sync(kFullMask, p.h_mask, src);
  r.lh = __shfl_sync(kFullMask, p.lh, src);
  r.lw = __shfl_sync(kFullMask, p.lw, src);
  r.a = __shfl_sync(kFullMask, p.a, src);
  return r;
}

// Warp item = (b, q, m, channel tile). Lane gl of group g handles channel chunk tile * tpg + gl.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    msda_forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, const typename AccOf<T>::type* __restrict__ loc,
                        const T* __restrict__ attn, T* __restrict__ out, MsdaSizes n, int tpg_log2, int64_t tiles) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int tpg = 1 << tpg_log2, groups = kWarp >> tpg_log2;
  const int g = lane >> tpg_log2, gl = lane & (tpg - 1);
  const int64_t chunks = n.D / VEC;
  const int n_pts = static_cast<int>(n.L * n.P);
  const int64_t row_stride = n.M * n.D;  // between consecutive positions s of one (b, m)
  const int64_t n_items = n.B * n.Q * n.M * tiles;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; item < n_items;
       item += warp_stride) {
    const int64_t bqm = item / tiles;
    const int64_t c = (item % tiles) * tpg + gl;
    const int64_t b = bqm / (n.Q * n.M), m = bqm % n.M;
    const bool active = c < chunks;
    const T* v = value + (b * n.S * n.M + m) * n.D + c * VEC;
    const int64_t point0 = bqm * n_pts;
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = A(0);
    for (int base = 0; base < n_pts; base += kWarp) {
      const Point<A> mine = prepare_point(base + lane, n_pts, point0, shapes, starts, loc, attn, n);
      const int count = min(kWarp, n_pts - base);
      for (int j = 0; j < count; j += groups) {  // uniform across the warp: shuffles stay convergent
        const Point<A> pt = shuffle_point(mine, j + g);
        const int mask = pt.h_mask & 15;
        if (j + g < count && active && mask) {
          const A hh = A(1) - pt.lh, hw = A(1) - pt.lw;
          const A w[4] = {hh * hw * pt.a, hh * pt.lw * pt.a, pt.lh * hw * pt.a, pt.lh * pt.lw * pt.a};
          const int64_t row[4] = {pt.row0, pt.row0 + 1, pt.row0 + pt.w, pt.row0 + pt.w + 1};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (mask & (1 << k)) {
              A x[VEC];
              load_vec<T, VEC>(v + row[k] * row_stride, x);
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[e] += w[k] * x[e];
            }
          }
        } else if (j + g < count && active) {
          // Off the map the sample is 0 (NaN at a non-finite location, whose lh is NaN); adding
          // weight * sample keeps the reference's NaN for a non-finite weight too.
          const A off_map = pt.a * pt.lh * A(0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += off_map;
        }
      }
    }
    for (int offset = tpg; offset < kWarp; offset <<= 1) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += __shfl_xor_sync(kFullMask, acc[e], offset);
    }
    if (g == 0 && active) {
      Pack<T, VEC> pk;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pk.v[e] = from_acc<T>(acc[e]);
      *reinterpret_cast<Pack<T, VEC>*>(out + bqm * n.D + c * VEC) = pk;
    }
  }
}

// Warp item = (b, q, m). A group samples one point; its lanes loop over the channel chunks.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    msda_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ value,
                         const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                         const typename AccOf<T>::type* __restrict__ loc, const T* __restrict__ attn,
                         typename AccOf<T>::type* __restrict__ grad_value,
                         typename AccOf<T>::type* __restrict__ grad_loc, T* __restrict__ grad_attn, MsdaSizes n,
                         int tpg_log2) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int tpg = 1 << tpg_log2, groups = kWarp >> tpg_log2;
  const int g = lane >> tpg_log2, gl = lane & (tpg - 1);
  const int64_t chunks = n.D / VEC;
  const int n_pts = static_cast<int>(n.L * n.P);
  const int64_t row_stride = n.M * n.D;
  const int64_t n_items = n.B * n.Q * n.M;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t bqm = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; bqm < n_items;
       bqm += warp_stride) {
    const int64_t b = bqm / (n.Q * n.M), m = bqm % n.M;
    const int64_t slice = (b * n.S * n.M + m) * n.D;  // (b, s=0, m, d=0) in value and grad_value
    const T* go = grad_out + bqm * n.D;
    const int64_t point0 = bqm * n_pts;
    for (int base = 0; base < n_pts; base += kWarp) {
      const Point<A> mine = prepare_point(base + lane, n_pts, point0, shapes, starts, loc, attn, n);
      const int count = min(kWarp, n_pts - base);
      for (int j = 0; j < count; j += groups) {  // uniform across the warp: shuffles stay convergent
        const Point<A> pt = shuffle_point(mine, j + g);
        const bool live = j + g < count;
        const int mask = live ? (pt.h_mask & 15) : 0;
        const A hh = A(1) - pt.lh, hw = A(1) - pt.lw;
        const A w[4] = {hh * hw, hh * pt.lw, pt.lh * hw, pt.lh * pt.lw};
        A s[4] = {A(0), A(0), A(0), A(0)};  // this lane's share of <grad_out, corner value>
        if (mask) {
          const int64_t row[4] = {pt.row0, pt.row0 + 1, pt.row0 + pt.w, pt.row0 + pt.w + 1};
          for (int64_t c = gl; c < chunks; c += tpg) {
            A gy[VEC];
            load_vec<T, VEC>(go + c * VEC, gy);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (mask & (1 << k)) {
                const int64_t offset = slice + row[k] * row_stride + c * VEC;
                A x[VEC];
                load_vec<T, VEC>(value + offset, x);
#pragma unroll
                for (int e = 0; e < VEC; ++e) s[k] += gy[e] * x[e];
                if (grad_value != nullptr) {
                  const A scale = pt.a * w[k];
                  A gv[VEC];
#pragma unroll
                  for (int e = 0; e < VEC; ++e) gv[e] = scale * gy[e];
                  atomic_add_vec<A, VEC>(grad_value + offset, gv);
                }
              }
            }
          }
        }
        A r_attn = w[0] * s[0] + w[1] * s[1] + w[2] * s[2] + w[3] * s[3];
        A r_x = hh * (s[1] - s[0]) + pt.lh * (s[3] - s[2]);  // d sample / d lw
        A r_y = hw * (s[2] - s[0]) + pt.lw * (s[3] - s[1]);  // d sample / d lh
        for (int offset = 1; offset < tpg; offset <<= 1) {  // stays inside the group of tpg lanes
          r_attn += __shfl_xor_sync(kFullMask, r_attn, offset);
          r_x += __shfl_xor_sync(kFullMask, r_x, offset);
          r_y += __shfl_xor_sync(kFullMask, r_y, offset);
        }
        if (live && gl == 0) {
          const int64_t idx = point0 + base + j + g;
          grad_attn[idx] = from_acc<T>(r_attn);
          grad_loc[2 * idx] = pt.a * static_cast<A>(pt.w) * r_x;
          grad_loc[2 * idx + 1] = pt.a * static_cast<A>(pt.h_mask >> 4) * r_y;
        }
      }
    }
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest channel vector (at most 16 bytes of T) that divides D and keeps every access aligned.
template <typename T>
int pick_vec(int64_t D, const void* a, const void* b, const void* acc_buffer = nullptr) {
  using A = typename AccOf<T>::type;
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    if (D % vec == 0 && aligned(a, vec * sizeof(T)) && aligned(b, vec * sizeof(T)) &&
        (acc_buffer == nullptr || aligned(acc_buffer, vec * sizeof(A)))) {
      return vec;
    }
  }
  return 1;
}

// Lanes per point group: the smallest power of two covering the channel chunks, at most a warp.
int tpg_log2_for(int64_t chunks) {
  int log2 = 0;
  while ((int64_t(1) << log2) < chunks && log2 < 5) ++log2;
  return log2;
}

template <typename T, typename F>
void with_vec(int vec, F&& f) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if (vec == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

unsigned blocks_for(int64_t warps) {
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* forward_typed(const void* value, const int64_t* shapes, const int64_t* starts, const void* loc,
                          const void* attn, void* out, MsdaSizes n, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int vec = pick_vec<T>(n.D, value, out);
  const int64_t chunks = n.D / vec;
  const int tpg_log2 = tpg_log2_for(chunks);
  const int64_t tiles = (chunks + (1 << tpg_log2) - 1) >> tpg_log2;
  const int64_t warps = n.B * n.Q * n.M * tiles;
  if (warps == 0) return nullptr;
  with_vec<T>(vec, [&](auto vc) {
    msda_forward_kernel<T, decltype(vc)::value><<<blocks_for(warps), kWarp * kWarpsPerBlock, 0, stream>>>(
        static_cast<const T*>(value), shapes, starts, static_cast<const A*>(loc), static_cast<const T*>(attn),
        static_cast<T*>(out), n, tpg_log2, tiles);
  });
  return last_error();
}

template <typename T>
const char* backward_typed(const void* grad_out, const void* value, const int64_t* shapes, const int64_t* starts,
                           const void* loc, const void* attn, void* grad_value, void* grad_loc, void* grad_attn,
                           MsdaSizes n, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int vec = pick_vec<T>(n.D, value, grad_out, grad_value);
  const int tpg_log2 = tpg_log2_for(n.D / vec);
  const int64_t warps = n.B * n.Q * n.M;
  if (warps == 0) return nullptr;
  with_vec<T>(vec, [&](auto vc) {
    msda_backward_kernel<T, decltype(vc)::value><<<blocks_for(warps), kWarp * kWarpsPerBlock, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(value), shapes, starts, static_cast<const A*>(loc),
        static_cast<const T*>(attn), static_cast<A*>(grad_value), static_cast<A*>(grad_loc),
        static_cast<T*>(grad_attn), n, tpg_log2);
  });
  return last_error();
}

}  // namespace

const char* msda_forward_cuda(MsdaDtype dtype, const void* value, const int64_t* spatial_shapes,
                              const int64_t* level_start_index, const void* sampling_locations,
                              const void* attention_weights, void* out, MsdaSizes n, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case MsdaDtype::kFloat64:
      return forward_typed<double>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   out, n, s);
    case MsdaDtype::kFloat32:
      return forward_typed<float>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  out, n, s);
    case MsdaDtype::kFloat16:
      return forward_typed<__half>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   out, n, s);
    case MsdaDtype::kBFloat16:
      return forward_typed<__nv_bfloat16>(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights, out, n, s);
  }
  return "unsupported dtype";
}

const char* msda_backward_cuda(MsdaDtype dtype, const void* grad_output, const void* value,
                               const int64_t* spatial_shapes, const int64_t* level_start_index,
                               const void* sampling_locations, const void* attention_weights, void* grad_value_acc,
                               void* grad_locations, void* grad_weights, MsdaSizes n, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case MsdaDtype::kFloat64:
      return backward_typed<double>(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, grad_value_acc, grad_locations, grad_weights, n, s);
    case MsdaDtype::kFloat32:
      return backward_typed<float>(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, grad_value_acc, grad_locations, grad_weights, n, s);
    case MsdaDtype::kFloat16:
      return backward_typed<__half>(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, grad_value_acc, grad_locations, grad_weights, n, s);
    case MsdaDtype::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, grad_value_acc, grad_locations, grad_weights, n, s);
  }
  return "unsupported dtype";
}

}  // namespace bev3d
