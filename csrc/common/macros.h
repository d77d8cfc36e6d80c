// Attributes shared by the kernels: host/device functions, CPU clones, restrict.
#pragma once

// Inline functions usable from the C++ CPU kernels and from the CUDA kernels (the *_math.h headers).
#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

// The CPU kernels' hot functions carry an AVX2 clone, picked at load time on CPUs that have it, so
// a portable build still runs 8-wide. (Each name in target_clones is a clone of its own: "avx2,fma"
// made an AVX2 clone, an FMA clone that no AVX2 CPU picks, and the default. Without FMA, a * b + c
// rounds the same in both clones.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FL_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FL_CPU_CLONES
#endif

// Pointers of a loop that never overlap: lets the compiler vectorise it.
#define FL_R __restrict__
