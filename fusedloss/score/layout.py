"""The score loss's data layout, shared by Python and Triton; csrc/score/score_math.h is its C++
twin (tests/test_layout.py checks that the two agree).

The fused kernels read the weights and the margin as runtime data, a float64 settings table, so
changing one recompiles nothing. Which terms a call computes is a term mask: ``CombinedLoss``
computes all three, ``AllPairsMarginRankingLoss`` only the ranking (it has no logits).
"""

# Terms in output order; bit i of a term mask says whether TERMS[i] is computed.
TERMS = ("regression", "classification", "ranking")
TERM_BIT = {term: 1 << i for i, term in enumerate(TERMS)}
ALL_TERMS = sum(TERM_BIT.values())
RANKING_ONLY = TERM_BIT["ranking"]

# Slots of the settings table: the three weights, then the margin.
SETTINGS = tuple(f"{term}_weight" for term in TERMS) + ("margin",)
MARGIN = SETTINGS.index("margin")

# Bits of the status a forward reports (check_finite), and what each names.
STATUS = {"scores": 1, "logits": 2, "total": 4}

# Largest batch whose ranking the GPU forwards count by comparing every pair directly; above it,
# they sort the two classes and binary-search (O(B log B), more launches: keys, two radix sorts of
# about 6 launches each). At B = 4096:
#   CUDA    a block of 8 warps takes 32 scores, each warp a strided eighth of the partners:
#           B / 8 = 512 compares per thread, B / 32 = 128 blocks;
#   Triton  a program of 4 warps compares a 64-score block with 32 partners per step:
#           B / 2 = 2048 compares per thread, B / 64 = 64 programs.
# 4096^2 compares in all take a few us on an H100/H200, and about 2048 sequential compares per
# thread (~10 us) cost what the sort path's extra launches cost; 4x more pairs (B = 8192) would
# not clearly pay. Estimates, not yet measured on a GPU (the seed-shapes benchmark times both
# sides). The CPU always sorts (measured no slower even at B = 64). CUDA's value: score_math.h.
ALL_PAIRS_MAX = {"cuda": 4096, "triton": 4096}
