// Host stand-in for the CUDA headers that csrc/ms_deform_attn_cuda_kernel.cu includes, so that the
// unmodified kernel source compiles as C++20 and runs on the CPU (tests/test_ms_deform_attn_emulated.py,
// docs/kernel.md). Only what the kernels use is here; anything else fails to compile, which is the
// point: the emulation must not quietly differ from CUDA.
//
// A warp is 32 lanes that run as fibers on one thread (emu_warp.cpp) and meet at every shuffle, where
// the emulator aborts unless all 32 lanes arrived at the same shuffle with a full mask. Vector atomics
// abort unless their address is aligned as the hardware requires.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Set by the warp scheduler before it resumes a lane (all lanes share the one host thread).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim, gridDim;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

using std::floor;
using std::isfinite;
inline int min(int a, int b) { return a < b ? a : b; }

// IEEE binary16 and bfloat16 storage with round-to-nearest-even conversions, as cuda_fp16.h/cuda_bf16.h.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const int exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
  float magnitude;
  if (exponent == 0x1f) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return h.bits & 0x8000 ? -magnitude : magnitude;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00)};   // NaN
  if (magnitude >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00)};  // rounds to inf (>= 65520)
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, i.e. a multiple of 2^-24
    float abs_f;
    std::memcpy(&abs_f, &magnitude, sizeof(abs_f));
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(abs_f * 16777216.0f)))};
  }
  // Rebias the exponent and round the 23-bit mantissa to 10 bits, ties to even; a carry out of the
  // mantissa correctly bumps the exponent.
  const uint32_t rebiased = magnitude - (uint32_t(127 - 15) << 23);
  return {static_cast<uint16_t>(sign | ((rebiased + 0xfffu + ((rebiased >> 13) & 1)) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t x = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40)};  // quiet NaN
  return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1)) >> 16)};
}

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The lanes of a warp never run at the same time, so these need no hardware atomics; they count
// themselves (emu::stats) and the vector ones (sm_90) abort on an address the GPU would fault on.
float atomicAdd(float* address, float v);
double atomicAdd(double* address, double v);
float2 atomicAdd(float2* address, float2 v);
float4 atomicAdd(float4* address, float4 v);

namespace emu {

enum class Op { kShuffle, kXorShuffle, kExit };

// What one lane brings to a warp-wide meeting: a shuffle, or the end of the kernel.
struct Arrival {
  Op op;
  unsigned mask;
  int lane_arg;  // source lane (kShuffle) or xor mask (kXorShuffle)
  int width;
  unsigned bytes;
  uint64_t bits;
  std::source_location site;
};

// Called by a lane: waits until all 32 lanes of its warp have arrived, checks that they agree and
// returns the bits of the lane this one reads from.
uint64_t meet(const Arrival& arrival);

template <typename T>
T shuffle(Op op, unsigned mask, T var, int lane_arg, int width, std::source_location site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "the emulator shuffles scalars of <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  const uint64_t result = meet({op, mask, lane_arg, width, sizeof(T), bits, site});
  T out;
  std::memcpy(&out, &result, sizeof(T));
  return out;
}

// Runs body once for every lane of every warp of the grid (a fresh fiber per lane and warp).
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

// `kernel<<<grid, block, shared_bytes, stream>>>(args...)`, which the emulation build rewrites into
// `::emu::Launch(grid, block, shared_bytes, stream).run(kernel, args...)`. Runs synchronously.
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  Launch(dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), shared_bytes(shared_bytes_) {}
  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    run_grid(grid, block, shared_bytes, [&] { kernel(args...); });
  }
};

// For the driver: launch every kernel with this many blocks instead of the launcher's grid (0: the
// launcher's own), which makes each warp loop over several items in the grid-stride loops.
void set_grid_override(unsigned blocks);

struct Stats {
  uint64_t meetings = 0, scalar_atomics = 0, float2_atomics = 0, float4_atomics = 0;
};
Stats& stats();

}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              std::source_location site = std::source_location::current()) {
  return emu::shuffle(emu::Op::kShuffle, mask, var, src_lane, width, site);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  std::source_location site = std::source_location::current()) {
  return emu::shuffle(emu::Op::kXorShuffle, mask, var, lane_mask, width, site);
}
