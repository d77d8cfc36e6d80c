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
# they sort the two classes and binary-search (O(B log B), a few more launches: keys, sort).
# Both limits give the same work per GPU thread: the CUDA kernel gives each thread one score and
# walks all B partners (2048 compares per thread at B = 2048); the Triton kernel compares a
# 64-score block with 128 partners per step on 128 threads (B / 2 compares per thread: 2048 at
# B = 4096). At about 2048 sequential compares (~10 us) a thread costs what the sort path's extra
# launches cost. Estimates, not yet measured on a GPU (the seed-shapes benchmark times both sides).
# The CPU always sorts (measured no slower even at B = 64). CUDA's value: score_math.h.
ALL_PAIRS_MAX = {"cuda": 2048, "triton": 4096}
