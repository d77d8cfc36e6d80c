"""The CUDA kernels of csrc/<family>/ on the CPU, under sanitizers (the tests marked simt). README.md,
"The CUDA kernels on the CPU", says what runs where; simt_cuda.h says how."""
