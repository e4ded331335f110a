// The vector row helpers of the machine's ISA: avx512_rows.h or avx2_rows.h (same functions, same meaning).
// SB_HAVE_ROWS is defined when one of them is; without it the kernels take their omp-simd loops.
#pragma once
#include "avx2_rows.h"
#include "avx512_rows.h"

#if defined(SB_HAVE_AVX512) || defined(SB_HAVE_AVX2_ROWS)
#define SB_HAVE_ROWS 1
#endif
