"""Planted bugs in the CUDA kernels: each must make its lane fail: ``pytest tests -m simt`` for a
wrong result, a race or a bad access (most of them), ``pytest tests/test_model.py -m model`` for a
kernel that moves more memory than its budget (T*: the traffic guard).

    python tests/simt/mutants.py              # every mutant: a markdown table of what caught it
    python tests/simt/mutants.py P1 S4        # some of them
    python tests/simt/mutants.py --list

Each mutant replaces one exact piece of a ``csrc/<family>/<family>_cuda.cu`` file (or of csrc/common/cuda_helpers.cuh) (found exactly once) in a copy
of ``csrc/``, then runs the lane on that copy (``FUSEDLOSS_SIMT_CSRC``), the mutated family's
tests first, stopping at the first failure. tests/test_simt_mutants.py checks in every CI run
that each mutant still applies to the current sources, and that one of them is caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under csrc/: <family>/<family>_cuda.cu or common/cuda_helpers.cuh
    bug: str
    find: str
    replace: str
    marker: str = "simt"  # the lane that must catch it: simt (correctness) or model (traffic budgets)

    @property
    def family(self) -> str | None:
        """The loss family of the file, None for the shared helpers (common/cuda_helpers.cuh)."""
        folder = Path(self.file).parent.name
        return folder if folder in ("pva", "blendshape", "score") else None


MUTANTS = [
    # ---- pva_cuda.cu ----
    Mutant("P1", "pva/pva_cuda.cu", "barrier removed between the lane sums' writes and reads",
           "lane_sums[k][ty][tx] = s[k];\n  __syncthreads();", "lane_sums[k][ty][tx] = s[k];\n"),
    Mutant("P2", "pva/pva_cuda.cu", "the last block does not reset the arrival counter",
           "if (tx == 0 && ty == 0) atomicExch(counter, 0u);", ""),
    Mutant("P3", "pva/pva_cuda.cu", "off-by-one in a shared index (one lane row too many)",
           "for (int l = 0; l < kLanes; ++l) v += lane_sums[ty][l][tx];",
           "for (int l = 0; l <= kLanes; ++l) v += lane_sums[ty][l][tx];"),
    Mutant("P4", "pva/pva_cuda.cu", "warp shuffle in a divergent branch",
           "    v = warp_sum(v);\n    if (tx == 0) partials[block * T + j] = v;",
           "    if (inside) v = warp_sum(v);\n    if (tx == 0) partials[block * T + j] = v;"),
    Mutant("P5", "pva/pva_cuda.cu", "wrong stride: target read along time with pred's time stride",
           "in.pred_strides[1], in.target_strides[1], in.L};", "in.pred_strides[1], in.pred_strides[1], in.L};"),
    Mutant("P6", "pva/pva_cuda.cu", "partial sums published without __threadfence",
           "  FL_SHARED(bool, is_last);\n  __threadfence();", "  FL_SHARED(bool, is_last);\n"),
    Mutant("P7", "pva/pva_cuda.cu", "time chunks overlap by one row", "it.t1 = min(it.t0 + kChunk, L);",
           "it.t1 = min(it.t0 + kChunk + 1, L);"),
    Mutant("P8", "pva/pva_cuda.cu", "backward: no bound check on the column", "  if (d >= in.D) return;\n", "\n"),
    Mutant("P9", "pva/pva_cuda.cu", "the last block reads the partials without __threadfence",
           "atomicExch(counter, 0u);  // every block has arrived: ready for the next launch\n  __threadfence();\n"
           "  for (int64_t j = ty;",
           "atomicExch(counter, 0u);  // every block has arrived: ready for the next launch\n"
           "  for (int64_t j = ty;"),
    Mutant("P10", "pva/pva_cuda.cu", "a missing (null) grad_total read as 1 instead of 0",
           "out.grad_total != nullptr ? *static_cast<const acc_t*>(out.grad_total) : acc_t(0);",
           "out.grad_total != nullptr ? *static_cast<const acc_t*>(out.grad_total) : acc_t(1);"),
    # ---- blendshape_cuda.cu ----
    Mutant("B1", "blendshape/blendshape_cuda.cu", "column partials of every batch group written to group 0's row",
           "acc_t* part = colpart + int64_t(blockIdx.y) * 2 * C;", "acc_t* part = colpart;"),
    Mutant("B2", "blendshape/blendshape_cuda.cu", "barrier removed after the landmark loop (e_s overwritten while read)",
           "gram_row(in.gram, e_s, idx, el.k, K);\n      }\n      __syncthreads();",
           "gram_row(in.gram, e_s, idx, el.k, K);\n      }\n"),
    Mutant("B3", "blendshape/blendshape_cuda.cu", "d/dtarget through the importance weights misses its 1/B",
           "w_col[kColSqErr * C + column] / static_cast<acc_t>(B);", "w_col[kColSqErr * C + column];"),
    Mutant("B4", "blendshape/blendshape_cuda.cu", "the last block's warp per column strides its groups by 16 (counted twice)",
           "for (int64_t g = lane; g < groups; g += 32) {", "for (int64_t g = lane; g < groups; g += 16) {"),
    Mutant("B5", "blendshape/blendshape_cuda.cu", "the last block reads the partials without __threadfence",
           "if (tid == 0) atomicExch(counter, 0u);  // every block has arrived: ready for the next launch\n"
           "  __threadfence();\n  const int warp",
           "if (tid == 0) atomicExch(counter, 0u);  // every block has arrived: ready for the next launch\n"
           "  const int warp"),
    Mutant("B6", "blendshape/blendshape_cuda.cu", "one final sum never written (uninitialised shared memory read)",
           "for (int s = warp; s <= kWeightedSum; s += kThreads / 32) {",
           "for (int s = warp; s < kWeightedSum; s += kThreads / 32) {"),
    Mutant("B7", "blendshape/blendshape_cuda.cu", "a missing (null) grad_total read as 1 instead of 0",
           "out.grad_total != nullptr ? *static_cast<const acc_t*>(out.grad_total) : acc_t(0);",
           "out.grad_total != nullptr ? *static_cast<const acc_t*>(out.grad_total) : acc_t(1);"),
    Mutant("B8", "blendshape/blendshape_cuda.cu", "vector runs: the smoothing term reads prev_pred instead of raw_pred",
           "load_masked<V>(raw_pred, off, 0, ok, ok == all, xv);\n#pragma unroll\n          for (int j = 0; j < V; ++j)\n"
           "            if (ok >> j & 1) sums[kSmoothAbs]",
           "load_masked<V>(prev_pred, off, 0, ok, ok == all, xv);\n#pragma unroll\n          for (int j = 0; j < V; ++j)\n"
           "            if (ok >> j & 1) sums[kSmoothAbs]"),
    Mutant("B9", "blendshape/blendshape_cuda.cu", "vector runs: the next time row read one element early",
           "load_masked<V>(pred, off, K, next, whole, xv);", "load_masked<V>(pred, off, K - 1, next, whole, xv);"),
    Mutant("B10", "blendshape/blendshape_cuda.cu", "backward vector runs: the next time row read one element early",
           "load_masked<V>(pred, off, K, after, after == all && K % V == 0, xv);",
           "load_masked<V>(pred, off, K - 1, after, after == all && K % V == 0, xv);"),
    Mutant("B11", "blendshape/blendshape_cuda.cu", "backward: vector runs taken without the inputs' layout and alignment test",
           "const bool vec_ok = vec_block<V>(in, st) && cuda::aligned16(grad_pred)",
           "const bool vec_ok = cuda::aligned16(grad_pred)"),
    Mutant("B12", "blendshape/blendshape_cuda.cu", "backward vector runs: a run's column statistics column by column all read at its first column",
           "    out[j] = x[el.t * st.K + el.k];\n    st.advance(el);", "    out[j] = x[el.t * st.K + el.k];"),
    # ---- score_cuda.cu ----
    Mutant("S1", "score/score_cuda.cu", "sorted path: real scores searched in their own row",
           "active_fakes(margin, s, sorted + B, B)", "active_fakes(margin, s, sorted, B)"),
    Mutant("S2", "score/score_cuda.cu", "all-pairs path: barrier removed before a tile is overwritten",
           "      __syncthreads();\n      if (t0 + tid < B) {", "      if (t0 + tid < B) {"),
    Mutant("S3", "score/score_cuda.cu", "radix sort of one bit too few", "0, int(sizeof(acc_t) * 8), stream)",
           "0, int(sizeof(acc_t) * 8) - 1, stream)"),
    Mutant("S4", "score/score_cuda.cu", "all-pairs path: off-by-one past the tile's end",
           "for (int i = warp; i < len; i += kWarps) {", "for (int i = warp; i <= len; i += kWarps) {"),
    Mutant("S5", "score/score_cuda.cu", "wrong stride: the second logit read next to the first",
           "l1 = load<scalar_t>(in.logits, at + in.logits_strides[1]);\n    sums[kBadLogits]",
           "l1 = load<scalar_t>(in.logits, at + 1);\n    sums[kBadLogits]"),
    Mutant("S6", "score/score_cuda.cu", "a non-finite score not reported in the status", "sums[kBadScores] += !isfinite(s);", ""),
    Mutant("S7", "score/score_cuda.cu", "keys kernel: reals padded with +inf in the fake row",
           "fake_row[e] = real ? -infinity<acc_t>() : to_acc(s[e]);",
           "fake_row[e] = real ? infinity<acc_t>() : to_acc(s[e]);"),
    Mutant("S9", "score/score_cuda.cu", "partial sums published without __threadfence",
           "  __threadfence();\n  __syncthreads();\n  if (tid == 0) is_last",
           "  __syncthreads();\n  if (tid == 0) is_last"),
    Mutant("S10", "score/score_cuda.cu", "the last block reads the partials without __threadfence",
           "atomicExch(counter, 0u);  // every block has arrived: ready for the next launch\n  __threadfence();\n",
           "atomicExch(counter, 0u);  // every block has arrived: ready for the next launch\n"),
    Mutant("S8", "score/score_cuda.cu", "backward: a block-stride loop instead of a grid-stride one (blocks overlap)",
           "k0 < vec_end; k0 += step * N) {\n    label_t label[N];",
           "k0 < vec_end; k0 += kThreads * N) {\n    label_t label[N];"),
    Mutant("S11", "score/score_cuda.cu", "a missing (null) grad_terms read as 1 instead of 0",
           "(gt != nullptr ? gt[t * g.grad_terms_stride] : acc_t(0))", "(gt != nullptr ? gt[t * g.grad_terms_stride] : acc_t(1))"),
    Mutant("S12", "score/score_cuda.cu", "the class test reads a float64 label rounded to the arithmetic type",
           "    real = is_real(label);  // the label as given, before rounding to acc_t\n    y = static_cast<acc_t>(label);",
           "    y = static_cast<acc_t>(label);\n    real = is_real(y);"),
    Mutant("S16", "score/score_cuda.cu", "all-pairs path: a score's count taken from the first warp's share only",
           "for (int w = 0; w < kWarps; ++w) n += warp_counts[w][lane];", "n = warp_counts[0][lane];"),
    Mutant("S17", "score/score_cuda.cu", "all-pairs path: the warps' counts summed without a barrier",
           "warp_counts[warp][lane] = count;\n    __syncthreads();", "warp_counts[warp][lane] = count;"),
    Mutant("S13", "score/score_cuda.cu", "backward: the vector path taken for an unaligned scores view",
           "(!gs || (in.scores_stride == 1 && cuda::aligned16(scores)))", "(!gs || in.scores_stride == 1)"),
    Mutant("S14", "score/score_cuda.cu", "keys kernel: the vector path taken for an unaligned labels view",
           "cuda::aligned16(labels) && cuda::aligned16(keys)", "cuda::aligned16(keys)"),
    Mutant("S15", "score/score_cuda.cu", "backward vector path: every logits row classed by its vector's first label",
           "is_real(to_acc(label[e])), out[2 * e],", "is_real(to_acc(label[0])), out[2 * e],"),
    # ---- traffic (tests/test_model.py's budgets): right or wrong results, more memory moved ----
    Mutant("T1", "pva/pva_cuda.cu", "backward: an extra read (d/dpred read before it is written)",
           "        grad_pred[idx] = cuda::from_acc<scalar_t>(g);",
           "        grad_pred[idx] = cuda::from_acc<scalar_t>(g + acc_t(0) * cuda::to_acc(grad_pred[idx]));",
           marker="model"),
    Mutant("T2", "pva/pva_cuda.cu", "forward: a strided access (lanes of a warp read columns 8 apart)",
           "const Column<scalar_t> col = column<scalar_t>(in, it.b, d);\n      if (o.last_frame && it.t0 == 0) s[kL]",
           "const Column<scalar_t> col = column<scalar_t>(in, it.b, (d * 8) % in.D);\n"
           "      if (o.last_frame && it.t0 == 0) s[kL]", marker="model"),
    # ---- common/cuda_helpers.cuh (every family) ----
    Mutant("C1", "common/cuda_helpers.cuh", "16-bit results truncated instead of rounded to nearest even",
           "return __float2half_rn(x);", "return __float2half_rz(x);"),
    Mutant("C2", "common/cuda_helpers.cuh", "block_sum: thread 0 reads the warps' sums without a barrier",
           "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n", "  if (lane == 0) scratch[warp] = v;\n"),
]
BY_NAME = {m.name: m for m in MUTANTS}


def apply(mutant: Mutant, csrc: Path) -> None:
    """Plant the bug in the copy ``csrc`` of csrc/."""
    path = csrc / mutant.file
    text = path.read_text()
    count = text.count(mutant.find)
    if count != 1:
        raise ValueError(f"{mutant.name}: its text occurs {count} times in {mutant.file}, not once: update the mutant")
    path.write_text(text.replace(mutant.find, mutant.replace))


def run(mutant: Mutant, tests: list[str] | None = None, timeout: float = 1800) -> tuple[bool, str, float]:
    """(caught, what caught it, seconds): the lane (or ``tests``) on a copy of csrc/ with the bug."""
    start = time.monotonic()
    # The mutated family's tests first (pytest would run a file named before its folder in the
    # folder's order), then the whole lane; the first run that fails says what caught the bug.
    if mutant.marker == "model":
        runs = [tests or ["tests/test_model.py", "-k", "cuda"]]
    else:
        runs = [tests] if tests else ([[f"tests/test_simt_{mutant.family}.py"]] if mutant.family else []) + [["tests"]]
    with tempfile.TemporaryDirectory(prefix=f"fusedloss-{mutant.name}-") as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(ROOT / "csrc", csrc)
        apply(mutant, csrc)
        env = {**os.environ, "FUSEDLOSS_SIMT_CSRC": str(csrc)}  # objects of unchanged files come from the cache
        for args in runs:
            command = [sys.executable, "-m", "pytest", *args, "-m", mutant.marker, "-x", "-q", "-p", "no:cacheprovider"]
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            if result.returncode != 0:
                break
    failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", result.stdout, re.M)
    if "simt: compiling" in result.stdout:  # not a planted bug but a broken file: the mutant is wrong
        return False, "does not compile", time.monotonic() - start
    caught = result.returncode == 1 and bool(failed)  # tests failed (not a collection or usage error)
    return caught, (failed[0] if failed else result.stdout.strip().splitlines()[-1]), time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [BY_NAME[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name}  {m.file:26s} {m.bug}")
        return 0
    print("| mutant | file | planted bug | caught by | seconds |\n|---|---|---|---|---:|", flush=True)
    survivors = 0
    for m in chosen:
        caught, by, seconds = run(m)
        survivors += not caught
        print(f"| {m.name} | {m.file} | {m.bug} | {by if caught else '**not caught**'} | {seconds:.0f} |", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
