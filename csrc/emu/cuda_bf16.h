// Stands in for CUDA's <cuda_bf16.h> in the host emulation (see emu_cuda.h).
#pragma once

#include "emu_cuda.h"
