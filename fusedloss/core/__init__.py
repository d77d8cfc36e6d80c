"""What every loss family shares, one module per concern:

  checks     argument checks (TypeError / ValueError naming the argument, metadata only)
  numerics   the arithmetic dtype, the mean over a possibly empty set
  extension  loading (or building on first use) the C++ extension of the cpu and cuda backends
  registry   the list of families; the C++ operators' fakes; the Triton operators before tracing
  autograd   the Triton operators' autograd (the Python twin of csrc/common/autograd.h), and
             the helpers of a call plan (constants, eager or traced)
  terms      the lazily built dict of named terms a loss returns
  module     the base class of the loss modules: configuration, float64 tables, plans cached
             per state
  triton     the Triton helpers (operator definition, grid budget, counters, reductions)

The backend choice is ``fusedloss.backends`` (public).
"""
