"""The planted bugs of tests/simt/mutants.py stay plantable, and the lane catches one of them in
every CI run (``python tests/simt/mutants.py`` runs them all)."""

import shutil

import pytest
from simt import mutants

pytestmark = pytest.mark.simt


def test_every_mutant_applies_to_the_current_sources(tmp_path):
    for mutant in mutants.MUTANTS:
        csrc = tmp_path / mutant.name / "csrc"
        shutil.copytree(mutants.ROOT / "csrc", csrc)
        mutants.apply(mutant, csrc)  # raises unless its text occurs exactly once
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    assert {m.family for m in mutants.MUTANTS} == {"pva", "blendshape", "score", None}


def test_a_removed_barrier_fails_the_lane():
    from simt import build

    reason = build.unavailable_reason()
    if reason:
        pytest.skip(f"simt lane: {reason}")
    caught, by, _ = mutants.run(mutants.BY_NAME["P1"], tests=["tests/test_simt_pva.py"])
    assert caught, f"the lane passed with mutant P1 ({mutants.BY_NAME['P1'].bug}): {by}"
