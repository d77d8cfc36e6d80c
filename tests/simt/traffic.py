"""The global-memory traffic of the CUDA kernels, measured by running them in the SIMT lane's trace
build (trace.h: every load and store of the .cu files reports its address).

``run_op(op, args, outputs)`` runs in a worker process started on ``build.kernels_module("trace")``
(``worker.Worker``; no sanitizer runtime is needed): it launches the CUDA host function of one
fusedloss operator call exactly as csrc/<family>/<family>.cpp does on a GPU (``cuda_inputs``, the
same outputs and workspace), with the operator's arguments as PyTorch passed them to the CPU
kernels, on an emulated device of ``sms`` SMs. It returns, per launch, the kernel, its grid and
block, and its traffic (fusedloss.benchmark.traffic.Traffic: unique sectors read and written,
sectors per warp request against the ideal), per argument buffer and per call site. With
``trace=False`` the launches are only recorded, not run (the configuration at any size: pass
``TensorSpec``s instead of tensors).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from fusedloss.benchmark.traffic import dense_ids, traffic_of

# trace.h's Event.
EVENT_DTYPE = np.dtype([("address", "<u8"), ("site", "<u8"), ("launch", "<u4"), ("block", "<u4"),
                        ("occurrence", "<u4"), ("thread", "<u2"), ("size", "u1"), ("store", "u1")])
assert EVENT_DTYPE.itemsize == 32


@dataclass(frozen=True)
class TensorSpec:
    """A tensor for the worker: its shape, strides and dtype, and its storage's bytes (``data``) or
    none (``materialize`` then allocates it without touching its pages). Tensors themselves cannot
    go through the worker's connection (torch pickles them as shared memory)."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    offset: int = 0
    data: bytes | None = None

    @staticmethod
    def of(t, with_data: bool = False):
        """The spec of a tensor (anything else as it is), with its storage's bytes if asked."""
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        data = bytes(t.untyped_storage()) if with_data else None
        return TensorSpec(tuple(t.shape), tuple(t.stride()), t.dtype, t.storage_offset(), data)

    def materialize(self) -> torch.Tensor:
        """The tensor, its storage aligned as the CUDA caching allocator aligns blocks (so that its
        sectors split as on a GPU); without data, its pages are not touched."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        span = sum((n - 1) * st for n, st in zip(self.shape, self.stride)) + 1 if all(self.shape) else 0
        nbytes = len(self.data) if self.data is not None else (self.offset + span) * itemsize
        raw = aligned_bytes(nbytes)
        if self.data:
            raw.copy_(torch.frombuffer(bytearray(self.data), dtype=torch.uint8))
        first = raw.storage_offset() // itemsize
        return torch.empty(0, dtype=self.dtype).set_(raw.untyped_storage(), first + self.offset, self.shape,
                                                     self.stride)


ALIGNMENT = 512  # bytes: the CUDA caching allocator's block alignment


def aligned_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` starting at a multiple of ALIGNMENT."""
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGNMENT
    return raw[skip:skip + nbytes]


def workspace(nbytes: int) -> torch.Tensor:
    """Scratch memory as harness.workspace (poisoned), aligned as on a GPU."""
    t = aligned_bytes(nbytes)
    t.fill_(0xFF)
    return t


def specs(values, with_data: bool):
    """``TensorSpec.of`` over a (nested) list of arguments."""
    if isinstance(values, (list, tuple)):
        return [specs(v, with_data) for v in values]
    return TensorSpec.of(values, with_data)


def _materialize(x):
    if hasattr(x, "materialize"):  # a TensorSpec (the worker loads this file under another module name)
        return x.materialize()
    if isinstance(x, list) and x and all(isinstance(v, bool) for v in x):
        return x  # an output mask
    if isinstance(x, (list, tuple)):
        return type(x)(_materialize(v) for v in x)
    return x


def span(t: torch.Tensor | None) -> tuple[int, int]:
    """(first byte, bytes) a tensor's elements span (strides >= 0)."""
    if t is None or t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), (last + 1) * t.element_size()


# ---- the operators' CUDA host calls, as csrc/<family>/<family>.cpp makes them --------------------

def _pva(k, h, op, args, outputs, buffers):
    if op == "pva_forward":
        pred, target, cond, table, dim_ws, loss_type, last, reg = args
    else:
        grad_terms, grad_total, pred, target, cond, table, dim_ws, loss_type, last, reg, mask = args
    m = k.pva
    inputs = h.make(m.CudaInputs, pred=h.address(pred), target=h.address(target), pred_strides=pred.stride(),
                    target_strides=target.stride(), table=h.address(table), num_parts=table.shape[0],
                    dim_ws=h.address(dim_ws), B=pred.shape[0], L=pred.shape[1], D=pred.shape[2],
                    dtype=h.dtype_of(pred), opts=h.make(m.Options, l1=loss_type == "l1", last_frame=last, reg=reg))
    if last:
        inputs.cond, inputs.cond_strides = h.address(cond), cond.stride()
    buffers.update(pred=pred, target=target, cond_frame=cond if last else None, part_table=table, dim_ws=dim_ws)
    if op == "pva_forward":
        terms, total = outputs
        ws = workspace(m.forward_workspace_bytes(inputs))
        buffers.update(terms=terms, total=total, workspace=ws, counter=h.arrival_counter())
        return lambda: m.forward_cuda(inputs, h.address(terms), h.address(total), h.address(ws),
                                      h.address(h.arrival_counter()))
    gp, gq, gc = outputs
    buffers.update(grad_terms=grad_terms, grad_total=grad_total, grad_pred=gp, grad_target=gq, grad_cond=gc)
    grads = h.make(m.CudaGradients, grad_terms=h.address(grad_terms),
                   grad_terms_stride=grad_terms.stride(0) if grad_terms is not None else 0,
                   grad_total=h.address(grad_total), grad_pred=h.address(gp if gp.numel() else None),
                   grad_target=h.address(gq if gq.numel() else None), grad_cond=h.address(gc if gc.numel() else None))
    return lambda: m.backward_cuda(inputs, grads)


def _strides3(x):
    if x is None:
        return [0, 0, 0]
    return list(x.stride()) if x.dim() == 3 else [x.stride(0), 0, x.stride(1)]


def _blendshape(k, h, op, args, outputs, buffers):
    if op == "blendshape_forward":
        pred, target, raw, prev, settings, group_coef, gram, rows, term_mask = args
    else:
        (grad_terms, grad_total, col_stats, pred, target, raw, prev, settings, group_coef, gram, rows, term_mask,
         mask) = args
    m = k.blendshape
    landmark = bool(term_mask & (1 << 4))  # blendshape_math.h kLandmark
    T = pred.shape[1] if pred.dim() == 3 else 1
    inputs = h.make(m.CudaInputs, pred=h.address(pred), target=h.address(target), raw_pred=h.address(raw),
                    prev_pred=h.address(prev), strides=[_strides3(x) for x in (pred, target, raw, prev)],
                    settings=h.address(settings), group_coef=h.address(group_coef),
                    group_len=0 if group_coef is None else group_coef.numel(),
                    gram=h.address(gram if landmark else None), dtype=h.dtype_of(pred),
                    problem=h.make(m.Problem, B=pred.shape[0], T=T, K=pred.shape[-1], J=rows, term_mask=term_mask,
                                   group_form=group_coef is not None))
    buffers.update(pred=pred, target=target, raw_pred=raw, prev_pred=prev, settings=settings, group_coef=group_coef,
                   landmark_gram=gram)
    if op == "blendshape_forward":
        terms, total, col_stats = outputs
        ws = workspace(m.forward_workspace_bytes(inputs))
        buffers.update(terms=terms, total=total, col_stats=col_stats, workspace=ws, counter=h.arrival_counter())
        return lambda: m.forward_cuda(inputs, h.address(terms), h.address(total), h.address(col_stats),
                                      h.address(ws), h.address(h.arrival_counter()))
    gp, gq, gr = outputs
    buffers.update(grad_terms=grad_terms, grad_total=grad_total, col_stats=col_stats, grad_pred=gp, grad_target=gq,
                   grad_raw=gr)
    grads = h.make(m.CudaGradients, grad_terms=h.address(grad_terms),
                   grad_terms_stride=grad_terms.stride(0) if grad_terms is not None else 0,
                   grad_total=h.address(grad_total), col_stats=h.address(col_stats),
                   grad_pred=h.address(gp if gp.numel() else None), grad_target=h.address(gq if gq.numel() else None),
                   grad_raw=h.address(gr if gr.numel() else None))
    return lambda: m.backward_cuda(inputs, grads)


def _score(k, h, op, args, outputs, buffers):
    if op == "score_forward":
        scores, logits, labels, settings, term_mask, smooth_l1, ranking_sum = args
    else:
        (grad_terms, grad_total, counts, rank_scale, scores, logits, labels, settings, term_mask, smooth_l1,
         ranking_sum, mask) = args
    m = k.score
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if labels.dtype not in (scores.dtype, acc, torch.float64):  # score.cpp labels_as_read: one conversion
        labels = labels.to(acc)
    cls = bool(term_mask & (1 << 1))  # score_math.h kClassification
    inputs = h.make(m.CudaInputs, scores=h.address(scores), scores_stride=scores.stride(0), labels=h.address(labels),
                    labels_stride=labels.stride(0), labels_dtype=h.dtype_of(labels),
                    logits=h.address(logits if cls else None),
                    logits_strides=list(logits.stride()) if cls else [0, 0], settings=h.address(settings),
                    problem=h.make(m.Problem, B=scores.shape[0], term_mask=term_mask, smooth_l1=smooth_l1,
                                   ranking_sum=ranking_sum), dtype=h.dtype_of(scores))
    buffers.update(scores=scores, logits=logits if cls else None, labels=labels, settings=settings)
    if op == "score_forward":
        terms, total, counts, rank_scale, status = outputs
        ws = workspace(m.forward_workspace_bytes(inputs))
        buffers.update(terms=terms, total=total, counts=counts, rank_scale=rank_scale, status=status, workspace=ws,
                       counter=h.arrival_counter())
        out = h.make(m.CudaOutputs, terms=h.address(terms), total=h.address(total),
                     counts=h.address(counts if counts.numel() else None), rank_scale=h.address(rank_scale),
                     status=h.address(status))
        return lambda: m.forward_cuda(inputs, out, h.address(ws), h.address(h.arrival_counter()))
    gs, gl = outputs
    ranking = bool(term_mask & (1 << 2))  # score_math.h kRanking
    buffers.update(grad_terms=grad_terms, grad_total=grad_total, counts=counts if ranking else None,
                   rank_scale=rank_scale, grad_scores=gs, grad_logits=gl)
    grads = h.make(m.CudaGradients, grad_terms=h.address(grad_terms),
                   grad_terms_stride=grad_terms.stride(0) if grad_terms is not None else 0,
                   grad_total=h.address(grad_total), counts=h.address(counts if ranking else None),
                   rank_scale=h.address(rank_scale), grad_scores=h.address(gs if gs.numel() else None),
                   grad_logits=h.address(gl if gl.numel() else None))
    return lambda: m.backward_cuda(inputs, grads)


FAMILIES = {"pva": _pva, "blendshape": _blendshape, "score": _score}


# ---- naming kernels and call sites from the module's debug information -------------------------

@functools.cache
def _module_path() -> str:
    return os.environ["FUSEDLOSS_SIMT_MODULE"]


def _addr2line(offsets: list[int], inlines: bool) -> list[list[tuple[str, str]]]:
    """(function, file:line) frames of each offset, innermost first."""
    if not offsets:
        return []
    flags = ["-f", "-C", "-i"] if inlines else ["-f", "-C"]
    # -a prints each address first, which separates the frames of consecutive addresses.
    out = subprocess.run(["addr2line", "-a", *flags, "-e", _module_path(), *[hex(o) for o in offsets]],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    result, frames = [], None
    i = 0
    while i < len(out):
        if out[i].startswith("0x"):
            frames = []
            result.append(frames)
            i += 1
            continue
        frames.append((out[i], out[i + 1] if i + 1 < len(out) else "??"))
        i += 2
    return result


def kernel_name(function: str) -> str:
    """``pva_forward_kernel<float>`` from addr2line's demangled signature."""
    m = re.search(r"(\w+_kernel)(<[^()]*>)?\(", function)
    return (m.group(1) + (m.group(2) or "")) if m else function


def _site_names(sites: list[int]) -> dict[int, str]:
    """file:line of each call site: the innermost frame in a csrc .cu file (else the innermost)."""
    names = {}
    for site, frames in zip(sites, _addr2line([s - 1 for s in sites], inlines=True)):  # the call, not the return
        where = [loc for _, loc in frames]
        cu = [w for w in where if ".cu:" in w or ".cuh:" in w]
        pick = cu[0] if cu else (where[0] if where else "??")
        names[site] = re.sub(r"^.*/csrc/", "", pick).split(" (")[0]
    return names


# ---- one operator call -----------------------------------------------------------------------------

def run_op(op: str, args: list, outputs: list, trace: bool = True, sms: int = 132, sites: bool = True) -> dict:
    """Launch the CUDA host function of ``fusedloss::<op>`` (in the trace worker). ``outputs``: the
    operator's outputs (tensors or specs) as PyTorch allocated them. Returns {"launches": [...]}."""
    from simt import harness as h

    k = h.use_device(sms)
    family = op.split("_")[0]
    args, outputs = _materialize(list(args)), _materialize(list(outputs))
    for t in outputs:
        if trace:
            h.poison(t)
    buffers: dict = {}
    launch = FAMILIES[family](k, h, op, args, outputs, buffers)
    names = [n for n, t in buffers.items() if t is not None and t.numel() > 0]
    ranges = [span(buffers[n]) for n in names]
    k.set_dry_run(not trace)
    k.clear_launches()
    try:
        if trace:
            k.trace_begin(ranges)
        error = launch()
        raw = k.trace_end() if trace else b""
    finally:
        k.set_dry_run(False)
    if error != 0:
        raise RuntimeError(f"{op}: cudaError {error}")
    if trace:
        assert h.arrival_counter().item() == 0, "the arrival counter is not 0 after the launch"
    records = k.launch_records()
    base = k.module_base()
    kernels = _addr2line([r["kernel"] - base for r in records if r["kernel"]], inlines=False)
    launches = []
    it = iter(kernels)
    for r in records:
        name = kernel_name(next(it)[0][0]) if r["kernel"] else r["library"]
        launches.append({"kernel": name, "grid": r["grid"], "block": r["block"], "library": r["library"],
                         "keys": r["keys"], "key_bytes": r["key_bytes"]})
    if trace:
        _attach_traffic(np.frombuffer(raw, dtype=EVENT_DTYPE), launches, names, ranges, sites)
    return {"launches": launches}


def _attach_traffic(ev: np.ndarray, launches: list[dict], names: list[str], ranges: list, with_sites: bool) -> None:
    address = ev["address"].astype(np.uint64)
    size = ev["size"].astype(np.int64)
    store = ev["store"].astype(bool)
    warp = (ev["thread"] // 32).astype(np.int64)
    request = dense_ids(ev["launch"].astype(np.int64), ev["block"].astype(np.int64), warp,
                        ev["site"].astype(np.int64), ev["occurrence"].astype(np.int64), store.astype(np.int64))
    lo = np.array([r[0] for r in ranges], dtype=np.uint64)
    order = np.argsort(lo)
    buffer = order[np.searchsorted(lo[order], address, side="right") - 1]
    site_names = _site_names(sorted(set(int(s) for s in np.unique(ev["site"])))) if with_sites and len(ev) else {}
    for i, launch in enumerate(launches):
        sel = ev["launch"] == i
        if launch["library"]:
            continue
        a, s, st, r, b = address[sel], size[sel], store[sel], request[sel], buffer[sel]
        launch["traffic"] = traffic_of(a, s, st, r).summary()
        per_block = np.bincount(ev["block"][sel].astype(np.int64), weights=s)
        launch["block_bytes"] = {"max": int(per_block.max()) if len(per_block) else 0,
                                 "mean": float(per_block.mean()) if len(per_block) else 0.0}
        per_buffer = {}
        for j in np.unique(b):
            t = traffic_of(a[b == j], s[b == j], st[b == j], r[b == j])
            per_buffer[names[j]] = {"read": 32 * t.read_sectors, "written": 32 * t.write_sectors,
                                    "excess": t.excess}
        launch["buffers"] = per_buffer
        if with_sites:
            per_site = {}
            sites = ev["site"][sel]
            for site in np.unique(sites):
                m = sites == site
                t = traffic_of(a[m], s[m], st[m], r[m])
                key = f"{site_names.get(int(site), hex(int(site)))} {'store' if st[m][0] else 'load'} {int(s[m][0])}B"
                prev = per_site.get(key)
                row = {"requests": t.load_requests + t.store_requests, "sectors": t.requested_sectors,
                       "ideal": t.ideal_sectors}
                if prev:
                    row = {k2: prev[k2] + row[k2] for k2 in row}
                per_site[key] = row
            launch["sites"] = per_site
