"""Every layout the kernels share has one definition per language, and the two agree.

Python and Triton read the layouts from ``fusedloss/<family>/layout.py``; the C++ CPU and CUDA
kernels from ``csrc/<family>/<family>_math.h``. This test compiles a small program that prints the
C++ values (the headers hold no torch code) and compares them with the Python ones, and checks that
no Triton kernel indexes a table with a bare slot number.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fusedloss.blendshape import layout as blendshape
from fusedloss.pva import layout as pva
from fusedloss.score import layout as score

ROOT = Path(__file__).resolve().parent.parent

# Python value -> the C++ expression that must equal it.
PAIRS = {
    **{f"pva.STATS[{i}]": (i, f"fusedloss::pva::k{s}") for i, s in enumerate(pva.STATS)},
    "len(pva.STATS)": (len(pva.STATS), "fusedloss::pva::kNumStats"),
    **{f"pva.TABLE_COLUMNS[{i}]": (i, f"fusedloss::pva::k{c}") for i, c in
       enumerate(("Start", "End", "Weight", "RegWeight"))},
    "len(pva.TABLE_COLUMNS)": (len(pva.TABLE_COLUMNS), "fusedloss::pva::kTableCols"),
    **{f"blendshape.TERMS[{i}]": (i, f"fusedloss::blendshape::k{c}") for i, c in
       enumerate(("Mse", "L1", "Perceptual", "Temporal", "Landmark", "Smoothing", "Consistency"))},
    "len(blendshape.TERMS)": (len(blendshape.TERMS), "fusedloss::blendshape::kNumTerms"),
    "blendshape.THRESHOLD": (blendshape.THRESHOLD, "fusedloss::blendshape::kThreshold"),
    "len(blendshape.SETTINGS)": (len(blendshape.SETTINGS), "fusedloss::blendshape::kNumSettings"),
    **{f"blendshape.SUMS[{i}]": (i, f"fusedloss::blendshape::k{c}") for i, c in
       enumerate(("SqErr", "AbsErr", "Active", "GroupSq", "TemporalSq", "LandmarkSq", "SmoothAbs", "ConsistencySq"))},
    "len(blendshape.SUMS)": (len(blendshape.SUMS), "fusedloss::blendshape::kNumSums"),
    "blendshape.WEIGHTED_SUM": (blendshape.WEIGHTED_SUM, "fusedloss::blendshape::kWeightedSum"),
    "blendshape.PARTIALS_WIDTH": (blendshape.PARTIALS_WIDTH, "fusedloss::blendshape::kPartialsWidth"),
    "blendshape.COL_IMPORTANCE": (blendshape.COL_IMPORTANCE, "fusedloss::blendshape::kColImportance"),
    "blendshape.COL_SQ_ERR": (blendshape.COL_SQ_ERR, "fusedloss::blendshape::kColSqErr"),
    "blendshape.COLUMN_PARTIALS_MAX": (blendshape.COLUMN_PARTIALS_MAX, "fusedloss::blendshape::kColumnPartialsMax"),
    **{f"score.TERMS[{i}]": (i, f"fusedloss::score::k{c}") for i, c in
       enumerate(("Regression", "Classification", "Ranking"))},
    "len(score.TERMS)": (len(score.TERMS), "fusedloss::score::kNumTerms"),
    "score.MARGIN": (score.MARGIN, "fusedloss::score::kMargin"),
    "len(score.SETTINGS)": (len(score.SETTINGS), "fusedloss::score::kNumSettings"),
    'score.STATUS["scores"]': (score.STATUS["scores"], "fusedloss::score::kScoresNotFinite"),
    'score.STATUS["logits"]': (score.STATUS["logits"], "fusedloss::score::kLogitsNotFinite"),
    'score.STATUS["total"]': (score.STATUS["total"], "fusedloss::score::kTotalNotFinite"),
    'score.ALL_PAIRS_MAX["cuda"]': (score.ALL_PAIRS_MAX["cuda"], "fusedloss::score::kCudaAllPairsMax"),
}


def cpp_values(tmp_path: Path) -> dict[str, int]:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lines = [f'  std::printf("{i} %lld\\n", static_cast<long long>({expr}));'
             for i, (_, expr) in enumerate(PAIRS.values())]
    source = tmp_path / "layout.cpp"
    source.write_text("#include <cstdio>\n#include \"pva/pva_math.h\"\n#include \"blendshape/blendshape_math.h\"\n"
                      "#include \"score/score_math.h\"\nint main() {\n" + "\n".join(lines) + "\n}\n")
    exe = tmp_path / "layout"
    build = subprocess.run([cxx, "-std=c++20", f"-I{ROOT / 'csrc'}", str(source), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    names = list(PAIRS)
    return {names[int(i)]: int(v) for i, v in (line.split() for line in out.splitlines())}


def test_python_and_cpp_layouts_agree(tmp_path):
    values = cpp_values(tmp_path)
    wrong = {name: (python, values[name]) for name, (python, _) in PAIRS.items() if values[name] != python}
    assert not wrong, f"Python vs C++ layout (python, c++): {wrong}"


def test_term_bits_follow_the_term_order():
    for layout in (blendshape, score):
        assert layout.TERM_BIT == {t: 1 << i for i, t in enumerate(layout.TERMS)}
    assert score.ALL_TERMS == 0b111 and score.RANKING_ONLY == score.TERM_BIT["ranking"]
    assert blendshape.PARTIALS_WIDTH >= len(blendshape.SUMS) + 1
    assert set(score.ALL_PAIRS_MAX) == {"cuda", "triton"}


BARE_SLOT = re.compile(r"(settings|terms|grad_terms)_ptr \+ \d|terms & \d|terms >> bit|\* 16\b|, 16, ")


def test_no_bare_slot_numbers_in_the_triton_kernels():
    for path in sorted((ROOT / "fusedloss").glob("*/triton.py")):
        hits = [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                if BARE_SLOT.search(line)]
        assert not hits, "bare slot numbers (use the family's layout.py):\n" + "\n".join(hits)


def test_module_settings_are_the_settings_slots():
    """Each slot of a family's settings table is a module attribute of that name, and assigning it
    writes that slot of the module's settings table."""
    from fusedloss import AllPairsMarginRankingLoss, BlendshapeLoss, CombinedLoss

    with_landmarks = BlendshapeLoss(landmark_matrix=torch.ones(2, 52))
    for module, slots in ((with_landmarks, blendshape.SETTINGS), (CombinedLoss(), score.SETTINGS),
                          (AllPairsMarginRankingLoss(), ("margin",))):
        for i, name in enumerate(slots):
            setattr(module, name, 0.125 + i)
        assert module.settings.tolist()[-len(slots):] == [0.125 + i for i in range(len(slots))]
        assert [getattr(module, name) for name in slots] == [0.125 + i for i in range(len(slots))]
        with pytest.raises(TypeError, match=slots[-1]):
            setattr(module, slots[-1], "0.5")
