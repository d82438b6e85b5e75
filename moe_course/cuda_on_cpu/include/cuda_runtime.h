// cuda_runtime.h for CUDA C run on the CPU: everything is in cuda_on_cpu.h.
#pragma once
#include "cuda_on_cpu.h"
