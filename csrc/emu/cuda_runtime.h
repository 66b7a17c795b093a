// Stands in for CUDA's <cuda_runtime.h> in the host emulation (see emu_cuda.h).
#pragma once

#include "emu_cuda.h"
