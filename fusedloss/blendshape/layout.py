"""The blendshape loss's data layout, shared by Python and Triton; csrc/blendshape/blendshape_math.h
is its C++ twin (tests/test_layout.py checks that the two agree).

The fused kernels read every setting as runtime data, so a weight changed between steps (a weight
schedule) recompiles nothing:
  settings      float64 [len(SETTINGS)]: the term weights (TERMS order), then the threshold
  group_coef    float64 [G]: the group form of the perceptual term as a per-column weight
  landmark_gram float64 [K, K]: M^T M of the landmark matrix M [J, K]
Which terms a call computes is a term mask: bit i set computes TERMS[i].
"""

# Terms in output order; bit i of a term mask says whether TERMS[i] is computed.
TERMS = ("mse", "l1", "perceptual", "temporal", "landmark", "smoothing", "consistency")
TERM_BIT = {term: 1 << i for i, term in enumerate(TERMS)}

# Slots of the settings table: one weight per term, then the threshold.
SETTINGS = tuple(f"{term}_weight" for term in TERMS) + ("threshold",)
THRESHOLD = SETTINGS.index("threshold")

# The sums a forward accumulates (blendshape_math.h: enum Sum), then the weighted sum of the
# default perceptual form; each program (CUDA block) writes one row of PARTIALS_WIDTH of them.
SUMS = ("sq_err", "abs_err", "active", "group_sq", "temporal_sq", "landmark_sq", "smooth_abs", "consistency_sq")
WEIGHTED_SUM = len(SUMS)
PARTIALS_WIDTH = 16  # a power of two >= len(SUMS) + 1

# Arguments of the operators' forward (pred, target, raw_pred, prev_pred, settings, ...): those
# with a gradient, and prev_pred, a constant of the loss (core/autograd.py's convention).
GRAD_INPUTS, CONSTANTS = (0, 1, 2), (3,)

# Rows of col_stats [2, T*K] (default perceptual form): importance weights, then sum_b e^2.
COL_IMPORTANCE, COL_SQ_ERR = 0, 1

# At most this many column partials ([batch groups, 2, T*K] scratch) per forward: wide inputs use
# fewer batch groups rather than more scratch.
COLUMN_PARTIALS_MAX = 1 << 17
