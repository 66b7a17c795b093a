// Driver of the CUDA host emulation; tests/msda_emulator.py writes its inputs and reads its outputs.
//
//   msda_emu run CASE OUT     the real launchers of ms_deform_attn_cuda_kernel.cu on one case
//   msda_emu convert IN OUT   float32 values -> the shim's float16 and bfloat16 (bits, and back)
//   msda_emu selftest NAME    a shuffle or atomic that the emulator must reject: it aborts
//
// CASE: "MSDAEMU1", 13 int64 (dtype as MsdaDtype, B, S, M, D, Q, L, P, grid blocks (0: the launcher's),
// value offset and grad_out offset in elements, rows missing at the end of value, compute grad_value),
// then value, spatial_shapes, level_start_index, sampling_locations (acc), attention_weights, grad_output.
// OUT: "MSDAOUT1", out, grad_value (acc; empty unless computed), grad_locations (acc), grad_weights,
// then 8 uint64: emu::Stats of the forward and of the backward launch.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu_cuda.h"
#include "ms_deform_attn_kernel.h"

namespace {

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "msda_emu: %s\n", message.c_str());
  std::exit(2);
}

// An array `offset` bytes past a 64-byte boundary, in an allocation that ends exactly where the array
// ends: AddressSanitizer flags the first byte read past either end.
class Buffer {
 public:
  explicit Buffer(size_t bytes, size_t offset = 0) : bytes_(bytes) {
    if (posix_memalign(&base_, 64, offset + bytes) != 0) die("out of memory");
    data_ = static_cast<char*>(base_) + offset;
  }
  ~Buffer() { std::free(base_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* base_ = nullptr;
  char* data_ = nullptr;
  size_t bytes_;
};

class File {
 public:
  File(const char* path, const char* mode) : f_(std::fopen(path, mode)) {
    if (f_ == nullptr) die(std::string("cannot open ") + path);
  }
  ~File() { std::fclose(f_); }
  void read(void* dst, size_t bytes) {
    if (bytes && std::fread(dst, 1, bytes, f_) != bytes) die("input file too short");
  }
  void write(const void* src, size_t bytes) {
    if (bytes && std::fwrite(src, 1, bytes, f_) != bytes) die("cannot write the output file");
  }
  void read(Buffer& b) { read(b.data(), b.bytes()); }
  void write(const Buffer& b) { write(b.data(), b.bytes()); }

 private:
  std::FILE* f_;
};

// Outputs start as NaN so that an element the kernel leaves unwritten shows.
void fill_nan(Buffer& b, bev3d::MsdaDtype dtype, size_t item) {
  const uint64_t nan = item == 8 ? 0x7ff8000000000000ull
                       : item == 4 ? 0x7fc00000ull
                       : dtype == bev3d::MsdaDtype::kFloat16 ? 0x7e00ull
                                                              : 0x7fc0ull;
  for (size_t i = 0; i < b.bytes(); i += item) std::memcpy(static_cast<char*>(b.data()) + i, &nan, item);
}

int run_case(const char* case_path, const char* out_path) {
  File in(case_path, "rb");
  char magic[8];
  in.read(magic, 8);
  if (std::memcmp(magic, "MSDAEMU1", 8) != 0) die("not a case file");
  int64_t f[13];
  in.read(f, sizeof(f));
  if (f[0] < 0 || f[0] > 3) die("bad dtype");
  const auto dtype = static_cast<bev3d::MsdaDtype>(f[0]);
  const bev3d::MsdaSizes n{f[1], f[2], f[3], f[4], f[5], f[6], f[7]};
  const size_t item = (dtype == bev3d::MsdaDtype::kFloat64) ? 8 : dtype == bev3d::MsdaDtype::kFloat32 ? 4 : 2;
  const size_t acc = dtype == bev3d::MsdaDtype::kFloat64 ? 8 : 4;
  const size_t points = n.B * n.Q * n.M * n.L * n.P, outputs = n.B * n.Q * n.M * n.D;
  const bool grad_value_wanted = f[12] != 0;

  Buffer value((n.B * n.S - f[11]) * n.M * n.D * item, f[9] * item), shapes(2 * n.L * 8), starts(n.L * 8);
  Buffer loc(2 * points * acc), attn(points * item), grad_out(outputs * item, f[10] * item);
  for (Buffer* b : {&value, &shapes, &starts, &loc, &attn, &grad_out}) in.read(*b);

  Buffer out(outputs * item), grad_loc(2 * points * acc), grad_attn(points * item);
  Buffer grad_value(grad_value_wanted ? n.B * n.S * n.M * n.D * acc : 0);
  fill_nan(out, dtype, item);
  fill_nan(grad_loc, dtype, acc);
  fill_nan(grad_attn, dtype, item);
  std::memset(grad_value.data(), 0, grad_value.bytes());  // the launcher's contract: atomics add into zeros

  emu::set_grid_override(static_cast<unsigned>(f[8]));
  const auto* shapes_p = static_cast<const int64_t*>(shapes.data());
  const auto* starts_p = static_cast<const int64_t*>(starts.data());
  const char* err = bev3d::msda_forward_cuda(dtype, value.data(), shapes_p, starts_p, loc.data(), attn.data(),
                                             out.data(), n, nullptr);
  if (err != nullptr) die(std::string("forward launch failed: ") + err);
  const emu::Stats forward = emu::stats();
  emu::stats() = {};
  err = bev3d::msda_backward_cuda(dtype, grad_out.data(), value.data(), shapes_p, starts_p, loc.data(), attn.data(),
                                  grad_value_wanted ? grad_value.data() : nullptr, grad_loc.data(), grad_attn.data(),
                                  n, nullptr);
  if (err != nullptr) die(std::string("backward launch failed: ") + err);
  const emu::Stats backward = emu::stats();

  File result(out_path, "wb");
  result.write("MSDAOUT1", 8);
  for (const Buffer* b : {&out, &grad_value, &grad_loc, &grad_attn}) result.write(*b);
  for (const emu::Stats& s : {forward, backward}) {
    const uint64_t counts[4] = {s.meetings, s.scalar_atomics, s.float2_atomics, s.float4_atomics};
    result.write(counts, sizeof(counts));
  }
  return 0;
}

int convert(const char* in_path, const char* out_path) {
  std::FILE* probe = std::fopen(in_path, "rb");
  if (probe == nullptr) die(std::string("cannot open ") + in_path);
  std::fseek(probe, 0, SEEK_END);
  const size_t count = static_cast<size_t>(std::ftell(probe)) / 4;
  std::fclose(probe);
  std::vector<float> x(count), half_back(count), bf16_back(count);
  std::vector<uint16_t> half_bits(count), bf16_bits(count);
  File(in_path, "rb").read(x.data(), 4 * count);
  for (size_t i = 0; i < count; ++i) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    half_bits[i] = h.bits;
    bf16_bits[i] = b.bits;
    half_back[i] = __half2float(h);
    bf16_back[i] = __bfloat162float(b);
  }
  File out(out_path, "wb");
  out.write(half_bits.data(), 2 * count);
  out.write(bf16_bits.data(), 2 * count);
  out.write(half_back.data(), 4 * count);
  out.write(bf16_back.data(), 4 * count);
  return 0;
}

// Kernels that break the rules the emulator enforces; each run must abort.
__global__ void shuffle_in_half_the_lanes(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[lane] = __shfl_sync(0xffffffffu, lane, 0);
}

__global__ void shuffle_with_partial_mask(int* out) {
  const int lane = threadIdx.x % 32;
  out[lane] = __shfl_sync(0x0000ffffu, lane, 0);
}

__global__ void misaligned_float4_atomic(float* sums) {
  if (threadIdx.x == 0) atomicAdd(reinterpret_cast<float4*>(sums + 1), make_float4(1.0f, 1.0f, 1.0f, 1.0f));
}

int selftest(const std::string& name) {
  int lanes[32] = {};
  alignas(16) float sums[8] = {};
  if (name == "divergent") {
    emu::Launch(1, 32).run(shuffle_in_half_the_lanes, lanes);
  } else if (name == "partial-mask") {
    emu::Launch(1, 32).run(shuffle_with_partial_mask, lanes);
  } else if (name == "misaligned-atomic") {
    emu::Launch(1, 32).run(misaligned_float4_atomic, sums);
  } else {
    die("unknown self-test " + name);
  }
  std::fprintf(stderr, "msda_emu: self-test %s was not caught\n", name.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "run" && argc == 4) return run_case(argv[2], argv[3]);
  if (mode == "convert" && argc == 4) return convert(argv[2], argv[3]);
  if (mode == "selftest" && argc == 3) return selftest(argv[2]);
  die("usage: msda_emu run CASE OUT | convert IN OUT | selftest divergent|partial-mask|misaligned-atomic");
}
