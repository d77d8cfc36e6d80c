"""The PVA loss's data layout, shared by Python and Triton; csrc/pva/pva_math.h is its C++ twin
(tests/test_layout.py checks that the two agree).

The fused kernels read the parts as a runtime float64 *part table* ``[P, len(TABLE_COLUMNS)]``,
so changing a weight never recompiles a kernel, and write the terms of a part in ``STATS`` order
(P V A, then L and R when enabled).
"""

# Statistics, in the order their terms appear within a part (pva_math.h: enum Stat).
STATS = ("P", "V", "A", "L", "R")
STAT_P, STAT_V, STAT_A, STAT_L, STAT_R = range(len(STATS))

# Columns of the part table (pva_math.h: enum TableCol).
TABLE_COLUMNS = ("start", "end", "weight", "reg_weight")
START, END, WEIGHT, REG_WEIGHT = range(len(TABLE_COLUMNS))
