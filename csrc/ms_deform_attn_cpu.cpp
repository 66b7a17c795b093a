// CPU kernels of bev3d::ms_deform_attn (float32, float64) and the op schema.
//
// Forward: one item per (b, m, q); each output row (b, q, m, :) is written by exactly one item.
// Backward: one task per (b, m); the task owns grad_value[b, :, m, :] (zeroes it, then scatters into
// it in a fixed order) and grad of every sampling point of head m, so there are no atomics and the
// result is bitwise reproducible for any thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ms_deform_attn.h"

namespace bev3d {
namespace {

// The four bilinear corners of one sampling point, in the order (h0, w0), (h0, w1), (h1, w0), (h1, w1).
template <typename T>
struct Corners {
  int64_t row[4];  // position s in value, or -1 when the corner is outside the map
  T weight[4];
  T lh, lw;        // fractional offsets of the point from (h0, w0)
  bool any;        // false when the point is so far outside that no corner contributes
};

// Pixel centres sit at (i + 0.5) / W, as in grid_sample(align_corners=False).
template <typename T>
inline Corners<T> corners_of(T x, T y, int64_t H, int64_t W, int64_t start) {
  Corners<T> c;
  const T h_im = y * static_cast<T>(H) - T(0.5);
  const T w_im = x * static_cast<T>(W) - T(0.5);
  // Also rejects NaN, and keeps floor() in int64 range.
  c.any = h_im > T(-1) && w_im > T(-1) && h_im < static_cast<T>(H) && w_im < static_cast<T>(W);
  if (c.any) {
    const int64_t h0 = static_cast<int64_t>(std::floor(h_im));
    const int64_t w0 = static_cast<int64_t>(std::floor(w_im));
    c.lh = h_im - static_cast<T>(h0);
    c.lw = w_im - static_cast<T>(w0);
    const bool h0_in = h0 >= 0, h1_in = h0 + 1 < H, w0_in = w0 >= 0, w1_in = w0 + 1 < W;
    const int64_t base = start + h0 * W + w0;
    c.row[0] = h0_in && w0_in ? base : -1;
    c.row[1] = h0_in && w1_in ? base + 1 : -1;
    c.row[2] = h1_in && w0_in ? base + W : -1;
    c.row[3] = h1_in && w1_in ? base + W + 1 : -1;
  } else {
    // Off the map the sample is 0, and NaN at a non-finite location as in grid_sample: NaN
    // fractions carry that through the weights into the output and all gradients.
    c.lh = c.lw = std::isfinite(x) && std::isfinite(y) ? T(0) : T(NAN);
    c.row[0] = c.row[1] = c.row[2] = c.row[3] = -1;
  }
  const T hh = T(1) - c.lh, hw = T(1) - c.lw;
  c.weight[0] = hh * hw;
  c.weight[1] = hh * c.lw;
  c.weight[2] = c.lh * hw;
  c.weight[3] = c.lh * c.lw;
  return c;
}

constexpr size_t kHugePage = size_t(2) << 20;

inline size_t round_to_huge_pages(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

// 2 MiB-aligned memory that Linux may back with transparent huge pages (like c10's allocator does
// under THP_MEM_ALLOC_ENABLE=1). With 4 KiB pages, first-touch faults on a fresh multi-MB grad_value
// cost more than the scatter into it, and random reads across 4 KiB pages miss the TLB.
inline void* alloc_huge(size_t bytes) {
  void* p = std::aligned_alloc(kHugePage, round_to_huge_pages(bytes));
  TORCH_CHECK(p != nullptr, "ms_deform_attn: out of memory allocating ", bytes, " bytes");
#ifdef __linux__
  madvise(p, round_to_huge_pages(bytes), MADV_HUGEPAGE);
#endif
  return p;
}

// Freed output buffers kept for the next call of the same size. Training allocates the same
// multi-MB grad_value every step, and first-touch page faults on a fresh one cost more than the
// whole scatter into it; like PyTorch's CUDA caching allocator, this pays them once.
class BufferPool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t k = 0; k < free_.size(); ++k) {
        if (free_[k].first == bytes) {
          void* p = free_[k].second;
          free_.erase(free_.begin() + k);
          cached_ -= bytes;
          return p;
        }
      }
    }
    return alloc_huge(bytes);
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kMaxCached) {
        free_.emplace_back(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  static constexpr size_t kMaxCached = size_t(256) << 20;
  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> free_;
  size_t cached_ = 0;
};

// Never destroyed: tensors holding its buffers may outlive static destruction.
BufferPool& output_pool() {
  static BufferPool* pool = new BufferPool;
  return *pool;
}

// An uninitialised output tensor; from 4 MiB up it comes from output_pool, in huge pages. Like
// at::empty it is NaN-filled under torch.use_deterministic_algorithms(True), which tests rely on.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < 2 * kHugePage) return at::empty(sizes, options);
  const size_t capacity = round_to_huge_pages(bytes);
  at::Tensor t = at::from_blob(output_pool().take(capacity), sizes,
                               [capacity](void* p) { output_pool().give(p, capacity); }, options);
  const auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory()) t.fill_(NAN);
  return t;
}

// A per-thread buffer reused across calls, so that its page faults are paid once.
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  void* get(size_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      data_ = nullptr;  // stays valid if alloc_huge throws
      data_ = alloc_huge(bytes);
      capacity_ = round_to_huge_pages(bytes);
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

// dst[s * stride + d] = src[s * row + d]: one head's grad written into the (S, M, D) grad_value.
// Non-temporal stores when rows are whole 16-byte vectors: nothing reads grad_value soon, and
// they skip reading every destination cache line first, which halves the memory traffic.
template <typename T>
inline void store_rows(T* dst, int64_t stride, const T* src, int64_t rows, int64_t row) {
#if defined(__SSE2__)
  const bool aligned = reinterpret_cast<uintptr_t>(dst) % 16 == 0 && (stride * sizeof(T)) % 16 == 0 &&
                       (row * sizeof(T)) % 16 == 0;
  if (aligned) {
    const int64_t vectors = row * sizeof(T) / 16;
    for (int64_t s = 0; s < rows; ++s) {
      __m128i* d = reinterpret_cast<__m128i*>(dst + s * stride);
      const __m128i* x = reinterpret_cast<const __m128i*>(src + s * row);
      for (int64_t k = 0; k < vectors; ++k) _mm_stream_si128(d + k, _mm_loadu_si128(x + k));
    }
    _mm_sfence();
    return;
  }
#endif
  for (int64_t s = 0; s < rows; ++s) std::copy(src + s * row, src + (s + 1) * row, dst + s * stride);
}

template <typename T>
inline void axpy(T* __restrict__ y, T a, const T* __restrict__ x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// out += sum_k a[k] * v_k, the common case of a point with all four corners inside the map.
template <typename T>
inline void axpy4(T* __restrict__ out, const T* a, const T* __restrict__ v0, const T* __restrict__ v1,
                  const T* __restrict__ v2, const T* __restrict__ v3, int64_t n) {
  const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += a0 * v0[i] + a1 * v1[i] + a2 * v2[i] + a3 * v3[i];
}

template <typename T>
inline T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// Runs body(task) for each task in [0, n_tasks) on ATen's threads, which take tasks one at a time
// from a shared counter: on a loaded machine a descheduled thread then does fewer tasks instead of
// holding up the others, as a static split would. The counter only schedules; every task writes
// its own outputs, so results do not depend on which thread ran what. Below about 100 us of work
// (`flops` in all) it runs inline: a parallel region would cost more, and far more on a busy machine.
template <typename F>
void for_each_task(int64_t n_tasks, int64_t flops, const F& body) {
  const int64_t workers = flops < (int64_t(1) << 18) ? 1 : std::min<int64_t>(n_tasks, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t task = next++; task < n_tasks; task = next++) body(task);
  });
}

// The corners of the L*P sampling points of one (b, q, m) into c[0 .. L*P), prefetching the rows they
// read in `map` and, when given, write in `grad`. The rows are scattered over maps larger than L2, and
// the kernels prepare query q + 1 before they use query q: the misses of a whole query are then in
// flight together instead of one point's at a time.
template <typename T>
void prepare_query(const T* loc, int64_t bqm, const int64_t* shapes, const int64_t* starts, const MsdaSizes& n,
                   const T* map, int64_t stride, const T* grad, Corners<T>* c) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t l = 0; l < n.L; ++l) {
    for (int64_t p = 0; p < n.P; ++p) {
      const int64_t i = (bqm * n.L + l) * n.P + p;
      Corners<T>& ci = c[l * n.P + p];
      ci = corners_of(loc[2 * i], loc[2 * i + 1], shapes[2 * l], shapes[2 * l + 1], starts[l]);
      if (!ci.any) continue;
      for (int k = 0; k < 4; ++k) {
        if (ci.row[k] < 0) continue;
        for (int64_t d = 0; d < n.D; d += line) {
          __builtin_prefetch(map + ci.row[k] * stride + d);
          if (grad != nullptr) __builtin_prefetch(grad + ci.row[k] * n.D + d, 1);
        }
      }
    }
  }
}

// The corners of the queries in flight: query q's sit in slot q % kSlots, and query q + kSlots - 1 is
// prepared (see prepare_query) just before query q is used.
template <typename T>
class CornerRing {
 public:
  static constexpr int64_t kSlots = 2;
  void reset(int64_t points) {
    points_ = points;
    ring_.resize(kSlots * points);
  }
  Corners<T>* slot(int64_t q) { return ring_.data() + q % kSlots * points_; }

 private:
  int64_t points_ = 0;
  std::vector<Corners<T>> ring_;
};

template <typename T>
void forward_cpu(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn, T* out,
                 const MsdaSizes& n) {
  // A task is a run of queries of one head, so that it keeps sampling one map, which stays in cache;
  // heads are split into runs only when there are fewer than 4 heads per thread.
  const int64_t runs = std::max<int64_t>(1, std::min(n.Q, (4 * at::get_num_threads() + n.B * n.M - 1) /
                                                              std::max<int64_t>(1, n.B * n.M)));
  const int64_t run_len = (n.Q + runs - 1) / runs;
  const int64_t stride = n.M * n.D;  // between positions s of one head in value
  for_each_task(n.B * n.M * runs, 8 * n.B * n.M * n.Q * n.L * n.P * n.D, [&](int64_t task) {
    thread_local CornerRing<T> corners;
    const int64_t bm = task / runs, b = bm / n.M, m = bm % n.M;
    const int64_t q_begin = task % runs * run_len, q_end = std::min(n.Q, q_begin + run_len);
    if (q_begin >= q_end) return;
    const T* v = value + (b * n.S * n.M + m) * n.D;  // position s at v + s * stride
    const auto prepare = [&](int64_t q) {
      prepare_query(loc, (b * n.Q + q) * n.M + m, shapes, starts, n, v, stride, static_cast<T*>(nullptr),
                    corners.slot(q));
    };
    corners.reset(n.L * n.P);
    for (int64_t q = q_begin; q < std::min(q_end, q_begin + corners.kSlots - 1); ++q) prepare(q);
    for (int64_t q = q_begin; q < q_end; ++q) {
      if (q + corners.kSlots - 1 < q_end) prepare(q + corners.kSlots - 1);
      const int64_t bqm = (b * n.Q + q) * n.M + m;
      T* o = out + bqm * n.D;  // (D,)
      std::fill(o, o + n.D, T(0));
      const Corners<T>* query_corners = corners.slot(q);
      for (int64_t j = 0; j < n.L * n.P; ++j) {
        const Corners<T>& c = query_corners[j];
        const T a = attn[bqm * n.L * n.P + j];
        if (!c.any) {
          // weight * sample (0, or NaN at a non-finite location) is NaN for a non-finite weight too,
          // as in the reference; only NaN compares unequal to zero here.
          const T off_map = a * c.weight[0] * T(0);
          if (off_map != T(0)) std::fill(o, o + n.D, off_map);
          continue;
        }
        const T w[4] = {a * c.weight[0], a * c.weight[1], a * c.weight[2], a * c.weight[3]};
        if (c.row[0] >= 0 && c.row[3] >= 0) {  // opposite corners inside -> all four are
          axpy4(o, w, v + c.row[0] * stride, v + c.row[1] * stride, v + c.row[2] * stride, v + c.row[3] * stride,
                n.D);
        } else {
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] >= 0) axpy(o, w[k], v + c.row[k] * stride, n.D);
          }
        }
      }
    }
  });
}

// grad_value may be nullptr: value needs no gradient, and only the points' gradients are computed.
template <typename T>
void backward_cpu(const T* grad_out, const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                  const T* attn, T* grad_value, T* grad_loc, T* grad_attn, const MsdaSizes& n) {
  const int64_t stride = n.M * n.D;  // between positions s of one head in value and grad_value
  for_each_task(n.B * n.M, n.B * n.M * (16 * n.Q * n.L * n.P + n.S) * n.D, [&](int64_t bm) {
    thread_local Scratch accumulator;
    thread_local CornerRing<T> corners;
    const int64_t b = bm / n.M, m = bm % n.M;
    const T* v = value + (b * n.S * n.M + m) * n.D;  // position s at v + s * stride
    // grad of this head's map, dense (S, D): the scatter stays within a few MB of cache instead of
    // striding over all heads' rows, and grad_value is then written once, in order.
    T* acc = nullptr;
    if (grad_value != nullptr) {
      acc = static_cast<T*>(accumulator.get(sizeof(T) * n.S * n.D));
      std::fill(acc, acc + n.S * n.D, T(0));
    }
    const auto prepare = [&](int64_t q) {
      prepare_query(loc, (b * n.Q + q) * n.M + m, shapes, starts, n, v, stride, acc, corners.slot(q));
    };
    corners.reset(n.L * n.P);
    for (int64_t q = 0; q < std::min(n.Q, corners.kSlots - 1); ++q) prepare(q);
    for (int64_t q = 0; q < n.Q; ++q) {
      if (q + corners.kSlots - 1 < n.Q) prepare(q + corners.kSlots - 1);
      const int64_t bqm = (b * n.Q + q) * n.M + m;
      const T* go = grad_out + bqm * n.D;  // (D,)
      const Corners<T>* query_corners = corners.slot(q);
      for (int64_t l = 0; l < n.L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        for (int64_t p = 0; p < n.P; ++p) {
          const int64_t i = (bqm * n.L + l) * n.P + p;
          const Corners<T>& c = query_corners[l * n.P + p];
          // s_k = <grad_out, value at corner k>; corners outside the map hold zeros.
          T s[4];
          for (int k = 0; k < 4; ++k) s[k] = c.row[k] >= 0 ? dot(go, v + c.row[k] * stride, n.D) : T(0);
          const T a = attn[i];
          const T hh = T(1) - c.lh, hw = T(1) - c.lw;
          grad_attn[i] = c.weight[0] * s[0] + c.weight[1] * s[1] + c.weight[2] * s[2] + c.weight[3] * s[3];
          grad_loc[2 * i] = a * static_cast<T>(W) * (hh * (s[1] - s[0]) + c.lh * (s[3] - s[2]));
          grad_loc[2 * i + 1] = a * static_cast<T>(H) * (hw * (s[2] - s[0]) + c.lw * (s[3] - s[1]));
          if (acc == nullptr) continue;
          for (int k = 0; k < 4; ++k) {
            if (c.row[k] >= 0) axpy(acc + c.row[k] * n.D, a * c.weight[k], go, n.D);
          }
        }
      }
    }
    if (acc != nullptr) store_rows(grad_value + (b * n.S * n.M + m) * n.D, stride, acc, n.S, n.D);
  });
}

void check_cpu(const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "the CPU ms_deform_attn kernel supports float32 and float64, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type(), "sampling_locations must have value's dtype");
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_, const at::Tensor& spatial_shapes_,
                              const at::Tensor& level_start_index_, const at::Tensor& sampling_locations_,
                              const at::Tensor& attention_weights_) {
  const MsdaSizes n =
      check_msda_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_);
  check_cpu(value_, sampling_locations_);
  const at::Tensor value = value_.contiguous(), shapes = spatial_shapes_.contiguous(),
                   starts = level_start_index_.contiguous(), loc = sampling_locations_.contiguous(),
                   attn = attention_weights_.contiguous();
  at::Tensor out = empty_output({n.B, n.Q, n.M * n.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_cpu<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                          loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& value_, const at::Tensor& spatial_shapes_,
    const at::Tensor& level_start_index_, const at::Tensor& sampling_locations_, const at::Tensor& attention_weights_,
    bool compute_grad_value) {
  const MsdaSizes n =
      check_msda_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_);
  check_cpu(value_, sampling_locations_);
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef({n.B, n.Q, n.M * n.D}) &&
                  grad_output_.scalar_type() == value_.scalar_type(),
              "grad_output must have shape (B, Q, M*D) and value's dtype, got ", grad_output_.sizes());
  const at::Tensor grad_out = grad_output_.contiguous(), value = value_.contiguous(),
                   shapes = spatial_shapes_.contiguous(), starts = level_start_index_.contiguous(),
                   loc = sampling_locations_.contiguous(), attn = attention_weights_.contiguous();
  // Every element is written by the kernel, grad_value by the task owning its (b, m) slice.
  at::Tensor grad_value = compute_grad_value ? empty_output(value.sizes(), value.options())
                                             : at::empty({0}, value.options());
  at::Tensor grad_loc = at::empty_like(loc), grad_attn = at::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_cpu<scalar_t>(grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                           starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                           compute_grad_value ? grad_value.data_ptr<scalar_t>() : nullptr,
                           grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), n);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY(bev3d, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool compute_grad_value=True) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bev3d, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace bev3d
