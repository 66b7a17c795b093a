"""Build and drive the host emulation of the CUDA kernels (csrc/emu; docs/kernel.md, "Emulation").

The unmodified csrc/ms_deform_attn_cuda_kernel.cu is compiled as C++20 against the shim headers in
csrc/emu, with AddressSanitizer and UBSan; the only change to its text is that each launch
`kernel<<<grid, block, shared, stream>>>(args)` becomes `::emu::Launch(grid, block, shared, stream)
.run(kernel, args)`, and a #line directive keeps reports pointing at the real file. Two builds:
"plain" (scalar atomics, the path of every GPU before sm_90) and "sm90" (__CUDA_ARCH__ = 900: float2
and float4 atomics). They are cached under ~/.cache/bev3d (or $TORCH_EXTENSIONS_DIR), keyed by a
hash of the sources, the flags and the compiler, and built once under a file lock (pytest-xdist).
"""

import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNEL = CSRC / "ms_deform_attn_cuda_kernel.cu"
EMU = CSRC / "emu"
ARCHS = {"plain": [], "sm90": ["-D__CUDA_ARCH__=900"]}
FLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Wno-unknown-pragmas", f"-I{EMU}", f"-I{CSRC}"]
# Leak checks need ptrace, which containers often forbid; a leak is no kernel bug anyway.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}  # MsdaDtype
_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^;{}\n]*?>)?)<<<([^;\n]*?)>>>\(")


def find_compiler():
    """(compiler, None) for the first of $CXX, g++, clang++ that compiles C++20, else (None, why not)."""
    tried = []
    for cxx in [os.environ.get("CXX"), "g++", "clang++"]:
        if not cxx or shutil.which(cxx) is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe.cpp"
            probe.write_text("#include <source_location>\n"
                             "int main() { return std::source_location::current().line() == 0; }\n")
            result = subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(Path(tmp) / "probe")],
                                    capture_output=True, text=True)
        if result.returncode == 0:
            return cxx, None
        tried.append(f"{cxx}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'}")
    return None, "no C++20 compiler found (tried $CXX, g++, clang++" + (f"; {'; '.join(tried)}" if tried else "") + ")"


def rewrite_launches(source):
    """The kernel source with its `<<<...>>>` launches turned into emu::Launch calls, lines kept."""
    rewritten, count = _LAUNCH.subn(r"::emu::Launch(\2).run(\1, ", source)
    if count != source.count("<<<"):
        raise RuntimeError(f"rewrote {count} of {source.count('<<<')} kernel launches in {KERNEL}")
    return f'#line 1 "{KERNEL}"\n{rewritten}'


def build(compiler):
    """{"plain": executable, "sm90": executable}, compiled on first use."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha1(repr((FLAGS, ARCHS, version)).encode())
    for path in [KERNEL, CSRC / "ms_deform_attn_kernel.h", *sorted(EMU.iterdir())]:
        h.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "bev3d")
    out = root / f"cuda_emulation_{h.hexdigest()[:16]}"
    exes = {arch: out / f"msda_emu_{arch}" for arch in ARCHS}
    if all(exe.exists() for exe in exes.values()):
        return exes
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(exe.exists() for exe in exes.values()):
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{out.name}.tmp"))
            try:
                _compile_into(tmp, compiler)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return exes


def _compile_into(directory, compiler):
    kernel = directory / "ms_deform_attn_cuda_kernel.emu.cpp"
    kernel.write_text(rewrite_launches(KERNEL.read_text()))
    units = {"warp": (EMU / "emu_warp.cpp", []), "main": (EMU / "emu_main.cpp", [])}
    units.update({f"kernel_{arch}": (kernel, defines) for arch, defines in ARCHS.items()})

    def compile_unit(name):
        source, defines = units[name]
        cmd = [compiler, *FLAGS, *defines, "-c", str(source), "-o", str(directory / f"{name}.o")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} for the CUDA emulation failed:\n{result.stderr[-4000:]}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(compile_unit, units))
    for arch in ARCHS:
        objects = [str(directory / f"{name}.o") for name in ("warp", "main", f"kernel_{arch}")]
        cmd = [compiler, "-fsanitize=address,undefined", *objects, "-o", str(directory / f"msda_emu_{arch}")]
        subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass
class Case:
    """One launch of the forward and the backward, with the tensors the CUDA binding would pass.

    value, attention_weights, grad_output in the kernel dtype; sampling_locations in its accumulation
    dtype (float64 for float64, else float32). value_missing_rows drops rows from the end of value's
    buffer (not from S) to plant an out-of-bounds read.
    """
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    grad_output: torch.Tensor
    grid_blocks: int = 0
    value_offset: int = 0
    grad_output_offset: int = 0
    value_missing_rows: int = 0
    compute_grad_value: bool = True


@dataclass
class Result:
    out: torch.Tensor
    grad_value: torch.Tensor
    grad_locations: torch.Tensor
    grad_weights: torch.Tensor
    forward_stats: dict
    backward_stats: dict


def run(exe, case, work_dir):
    """Runs one case; returns a Result, or the CompletedProcess when the emulator failed."""
    B, S, M, D = case.value.shape
    Q, L, P = case.sampling_locations.shape[1], case.spatial_shapes.shape[0], case.sampling_locations.shape[4]
    dtype = case.value.dtype
    header = [DTYPE_CODES[dtype], B, S, M, D, Q, L, P, case.grid_blocks, case.value_offset,
              case.grad_output_offset, case.value_missing_rows, int(case.compute_grad_value)]
    value = case.value.flatten(0, 1)[:B * S - case.value_missing_rows]  # a view, also of an expanded value
    arrays = [value, case.spatial_shapes.long(), case.level_start_index.long(), case.sampling_locations,
              case.attention_weights, case.grad_output]
    case_file, out_file = Path(work_dir) / "case.bin", Path(work_dir) / "out.bin"
    case_file.write_bytes(b"MSDAEMU1" + struct.pack("<13q", *header) + b"".join(_bytes(t) for t in arrays))
    proc = subprocess.run([str(exe), "run", str(case_file), str(out_file)], capture_output=True, text=True,
                          env={**os.environ, **SANITIZER_ENV}, timeout=300)
    if proc.returncode != 0:
        return proc
    acc = case.sampling_locations.dtype
    shapes = [((B, Q, M * D), dtype), ((B, S, M, D) if case.compute_grad_value else (0,), acc),
              (tuple(case.sampling_locations.shape), acc), (tuple(case.attention_weights.shape), dtype)]
    data = out_file.read_bytes()
    assert data[:8] == b"MSDAOUT1"
    pos, tensors = 8, []
    for shape, dt in shapes:
        n = torch.Size(shape).numel() * dt.itemsize
        tensors.append(torch.frombuffer(bytearray(data[pos:pos + n]), dtype=dt).reshape(shape) if n else
                       torch.empty(shape, dtype=dt))
        pos += n
    counts = struct.unpack("<8Q", data[pos:])
    names = ("meetings", "scalar_atomics", "float2_atomics", "float4_atomics")
    return Result(*tensors, dict(zip(names, counts[:4])), dict(zip(names, counts[4:])))


def run_tool(exe, *args):
    """Runs the emulator with other arguments (convert, selftest); returns the CompletedProcess."""
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **SANITIZER_ENV}, timeout=300)


def _bytes(t):
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()
