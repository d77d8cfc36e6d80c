"""Whatever a user changes on a loss module takes effect on the next call, or raises.

The changes are enumerated from each module's constructor signature, not listed by hand: every
constructor argument is assigned (``setattr``) after a first call, with values derived from its
annotation and its value in the base configuration (the other choices of a ``Literal``, a flipped
bool, another real and 0 for a weight, a scaled copy or None for a table, a scaled or shortened
mapping or sequence, a process group). Each such change is also made in the ways a training
script makes it: on a deep copy or an unpickled copy (the original must not follow), between a
forward and its backward (the backward uses what the forward saw), and through
``load_state_dict`` of a module built with it. Tables are also edited in place. A constructor
argument whose annotation has no recipe here fails the test, so the list cannot go stale.

Every changed module is compared with a module freshly built with the changed configuration,
on the same inputs: the total, every term and the gradients of every differentiable input. A
change may instead raise TypeError/ValueError (or BackendUnavailableError) when assigned, and
then must leave the module as it was. An invalid value must raise when assigned.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import typing
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
import torch.distributed as dist

import fusedloss
from fusedloss import AllPairsMarginRankingLoss, BlendshapeLoss, CombinedLoss, PVALoss, backends

D, K, J = 9, 7, 5


def _table(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


@dataclasses.dataclass
class Case:
    cls: type
    base: dict                     # constructor arguments but backend
    inputs: Callable               # (generator, B) -> [(tensor, requires_grad), ...]
    call: Callable                 # (module, *tensors) -> (total, {name: term})


def _pva_inputs(g, B):
    return [(torch.randn(B, 5, D, generator=g, dtype=torch.float64), True),
            (torch.randn(B, 5, D, generator=g, dtype=torch.float64), True),
            (torch.randn(B, D, generator=g, dtype=torch.float64), True)]


def _blendshape_inputs(g, B):
    return [(torch.rand(B, 4, K, generator=g, dtype=torch.float64), True),
            (torch.rand(B, 4, K, generator=g, dtype=torch.float64), True),
            (torch.rand(B, 4, K, generator=g, dtype=torch.float64), True),
            (torch.rand(B, 4, K, generator=g, dtype=torch.float64), False)]   # prev_pred: a constant


def _score_inputs(g, B):
    labels = (torch.arange(B) % 3 == 0).to(torch.float64)[:, None]
    return [(torch.rand(B, 1, generator=g, dtype=torch.float64), True),
            (torch.randn(B, 2, generator=g, dtype=torch.float64), True), (labels, False)]


def _ranking_inputs(g, B):
    return [(torch.rand(B, generator=g, dtype=torch.float64), True),
            ((torch.arange(B) % 3 == 0).to(torch.float64), False)]


def _terms(total, terms):
    return total, {k: v for k, v in terms.items() if k != "total"}


CASES = {
    "pva": Case(PVALoss, dict(part_w_dict={"a": (0, 4, 1.0), "b": (3, 0, 0.5), "c": (6, 9, 2.0)},
                              use_last_frame_loss=True, use_reg_loss=True, dim_ws=_table(D, seed=1), loss_type="l2",
                              reg_weights={"b": 0.3}),
                _pva_inputs, lambda m, p, t, c: _terms(*m(p, t, c))),
    "blendshape": Case(BlendshapeLoss, dict(mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, temporal_weight=0.3,
                                            landmark_weight=0.4, smoothing_weight=0.2, consistency_weight=0.25,
                                            threshold=0.3, perceptual_groups=(((0, 1, 2), 1.0), ((2, 5), 0.5)),
                                            landmark_matrix=_table(J, K, seed=2)),
                       _blendshape_inputs, lambda m, p, t, r, q: _terms(*m(p, t, r, q, return_components=True))),
    "combined": Case(CombinedLoss, dict(regression_weight=1.0, classification_weight=0.3, ranking_weight=0.2,
                                        regression_type="mse", margin=0.5, check_finite=True),
                     _score_inputs, lambda m, s, lo, y: _terms(*m(s, lo, y))),
    "ranking": Case(AllPairsMarginRankingLoss, dict(margin=0.5, reduction="mean"),
                    _ranking_inputs, lambda m, s, y: (m(s, y), {})),
}
BACKENDS = ("reference", "cpu", "triton")
ERRORS = (TypeError, ValueError, backends.BackendUnavailableError)


def _parameters(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _annotations(cls) -> dict:
    return typing.get_type_hints(cls.__init__, globalns=vars(__import__(cls.__module__, fromlist=["_"])))


# ---------------------------------------------------------------------------------------------
# Values of a changed argument, from its annotation and its base value
# ---------------------------------------------------------------------------------------------


def _scale_reals(value):
    """The value with every real number (not bool, not int) scaled: other weights, same structure."""
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, Mapping):
        return {k: _scale_reals(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_scale_reals(v) for v in value)
    raise TypeError(type(value))


def _drop_last(value):
    if isinstance(value, Mapping):
        return dict(list(value.items())[:-1])
    return type(value)(list(value)[:-1])


def _types(annotation) -> tuple:
    """The classes of a (possibly optional or Literal) annotation, with Literal's values."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return tuple(t for arg in typing.get_args(annotation) for t in _types(arg))
    return (annotation,)


def alternatives(annotation, base, group) -> list:
    """Other values of an argument (what a user may assign), or raise if there is no recipe."""
    kinds = _types(annotation)
    literals = [a for k in kinds if typing.get_origin(k) is typing.Literal for a in typing.get_args(k)]
    optional = type(None) in kinds
    if literals:
        return [v for v in literals if v != base]
    if bool in kinds:
        return [not base]
    if float in kinds:
        return [base * 1.5 + 0.25, 0.0] if base else [0.4]
    if torch.Tensor in kinds and isinstance(base, torch.Tensor):
        return [base * 1.5 + 0.1] + ([None] if optional else [])
    if dist.ProcessGroup in kinds:
        return [group] if base is None else [None]
    if any(typing.get_origin(k) in (Mapping, Sequence, tuple) or k in (Mapping, Sequence) for k in kinds):
        out = [_scale_reals(base)] if base is not None else []
        if base is not None and len(base) > 1:
            out.append(_drop_last(base))
        return out + ([None] if optional and base is not None else [])
    raise AssertionError(f"no recipe for an argument annotated {annotation!r} (base value {base!r}): add one here")


# ---------------------------------------------------------------------------------------------
# Running a module and comparing it with a fresh one
# ---------------------------------------------------------------------------------------------


class Raised(Exception):
    pass


def run(case: Case, module, inputs):
    """(total, terms, grads) of one forward and backward with grad_output != 1 on every term."""
    leaves = [x.detach().clone().requires_grad_(grad) for x, grad in inputs]
    total, terms = case.call(module, *leaves)
    objective = 1.3 * total + sum((0.7 + 0.1 * i) * v for i, v in enumerate(terms.values()))
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(objective, wanted, allow_unused=True) if objective.requires_grad else [None] * len(
        wanted)
    return total.detach(), {k: v.detach() for k, v in terms.items()}, [g if g is None else g.detach() for g in grads]


def outcome(case: Case, make, inputs):
    """run() of the module ``make()`` builds, or Raised if building or running it raises."""
    try:
        return run(case, make(), inputs)
    except ERRORS + (RuntimeError,) as exc:
        return Raised(f"{type(exc).__name__}: {exc}")


def differences(got, expected) -> str | None:
    """None if ``got`` equals ``expected`` (values, every term, gradients), else what differs."""
    if isinstance(expected, Raised) or isinstance(got, Raised):
        if isinstance(expected, Raised) and isinstance(got, Raised):
            return None
        return f"got {got!r:.300}, a fresh module gives {expected!r:.300}"
    (total, terms, grads), (e_total, e_terms, e_grads) = got, expected
    if list(terms) != list(e_terms):
        return f"terms {list(terms)} != {list(e_terms)}"
    pairs = [("total", total, e_total)] + [(k, terms[k], e_terms[k]) for k in terms]
    pairs += [(f"grad {i}", g if g is not None else torch.zeros_like(e), e if e is not None else torch.zeros_like(g))
              for i, (g, e) in enumerate(zip(grads, e_grads)) if g is not None or e is not None]
    for name, a, b in pairs:
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-9, atol=1e-12 * max(1.0, float(b.abs().max()))):
            return f"{name}: {a} != {b} (a fresh module's)"
    return None


@pytest.fixture(scope="module")
def group():
    """A process group of this process alone (gloo): the loss over it is the local loss."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def _available(backend):
    reason = backends.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)


def _items():
    for family, case in CASES.items():
        for backend in BACKENDS:
            for name in _parameters(case.cls):
                yield pytest.param(family, backend, name, id=f"{family}-{backend}-{name}")


@pytest.mark.parametrize("family, backend, name", list(_items()))
def test_every_constructor_argument_can_be_changed(family, backend, name, group):
    _available(backend)
    case = CASES[family]
    base = {**case.base, "backend": backend}
    annotation = _annotations(case.cls)[name]
    default = _parameters(case.cls)[name].default
    current = base.get(name, default)
    values = alternatives(annotation, current, group)
    g = torch.Generator().manual_seed(0)
    inputs = case.inputs(g, 6)

    def build(**change):
        return case.cls(**{**base, **change})

    expected_base = outcome(case, build, inputs)
    assert not isinstance(expected_base, Raised), expected_base
    fresh = build()
    assert hasattr(fresh, name), f"{name} is a constructor argument but not readable as an attribute"
    failures = []
    # The Triton interpreter is slow: what no backend handles on its own (loading, copies, invalid
    # values: core/module.py) runs on the other backends only.
    kinds = ("assigned", "between forward and backward")
    if backend != "triton":
        kinds += ("loaded", "on a deep copy", "on an unpickled copy")
    for value in values:
        expected = outcome(case, lambda: build(**{name: value}), inputs)
        for kind in kinds:
            problem = _change(case, build, name, value, kind, inputs, expected, expected_base)
            if problem:
                failures.append(f"{kind} {name} = {_short(value)}: {problem}")
    if isinstance(current, torch.Tensor):   # a table edited in place
        module = build()
        run(case, module, inputs)
        with torch.no_grad():
            getattr(module, name).mul_(1.5).add_(0.1)
        problem = differences(outcome(case, lambda: module, inputs),
                              outcome(case, lambda: build(**{name: current * 1.5 + 0.1}), inputs))
        if problem:
            failures.append(f"{name} edited in place: {problem}")
    if backend == "triton":
        assert not failures, "\n".join(failures)
        return
    # An invalid value raises when assigned, naming the argument, and changes nothing.
    module = build()
    run(case, module, inputs)
    try:
        setattr(module, name, object())
        failures.append(f"{name} = object() was accepted")
    except (TypeError, ValueError) as exc:
        if name not in str(exc):
            failures.append(f"{name} = object() raised without naming it: {exc}")
        problem = differences(outcome(case, lambda: module, inputs), expected_base)
        if problem:
            failures.append(f"a rejected {name} = object() changed the module: {problem}")
    assert not failures, "\n".join(failures)


def _short(value):
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return repr(value)[:80]


def _change(case, build, name, value, kind, inputs, expected, expected_base) -> str | None:
    module = build()
    if kind == "between forward and backward":
        leaves = [x.detach().clone().requires_grad_(grad) for x, grad in inputs]
        total, terms = case.call(module, *leaves)
        try:
            setattr(module, name, value)
        except ERRORS as exc:
            return None if isinstance(expected, Raised) else f"raised when assigned, though a module built with it runs: {exc}"
        objective = 1.3 * total + sum((0.7 + 0.1 * i) * v for i, v in enumerate(terms.values()))
        try:
            grads = torch.autograd.grad(objective, [x for x in leaves if x.requires_grad], allow_unused=True)
        except RuntimeError as exc:
            return f"backward raised {exc}"
        return differences((total.detach(), {k: v.detach() for k, v in terms.items()}, grads), expected_base)
    run(case, module, inputs)   # a first call (plans, caches, moved tables)
    if kind == "loaded":
        try:
            other = build(**{name: value})
        except ERRORS:
            return None
        try:
            module.load_state_dict(other.state_dict())
        except RuntimeError as exc:   # only torch's clear errors: another number of parts, a table absent
            clear = any(s in str(exc) for s in ("size mismatch", "Missing key(s)", "Unexpected key(s)"))
            return None if clear else f"load_state_dict raised {exc}"
        same = _same_state(other.state_dict(), build().state_dict())
        return differences(outcome(case, lambda: module, inputs), expected_base if same else expected)
    target = module
    if kind == "on a deep copy":
        target = copy.deepcopy(module)
    elif kind == "on an unpickled copy":
        target = pickle.loads(pickle.dumps(module))
    try:
        setattr(target, name, value)
    except ERRORS as exc:
        if not isinstance(expected, Raised):
            return f"raised when assigned, though a module built with it runs: {exc}"
        problem = differences(outcome(case, lambda: target, inputs), expected_base)
        return problem and f"raised when assigned, but changed the module: {problem}"
    problem = differences(outcome(case, lambda: target, inputs), expected)
    if not problem and target is not module:
        problem = differences(outcome(case, lambda: module, inputs), expected_base)
        problem = problem and f"the original followed its copy: {problem}"
    return problem


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Changes of the module as a whole
# ---------------------------------------------------------------------------------------------

MODULE_CHANGES = {
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "bfloat16 then float": lambda m: m.bfloat16().float(),
    "to cpu": lambda m: m.to("cpu"),
    "eval": lambda m: m.eval(),
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "state dict round trip": lambda m: (m.load_state_dict(m.state_dict()), m)[1],
    "loaded into a fresh module": lambda m: (lambda fresh: (fresh.load_state_dict(m.state_dict()), fresh)[1]),
}

TRITON_MODULE_CHANGES = ("half", "loaded into a fresh module")   # (the tables' dtype and values)


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_wide_changes(family, backend):
    """Dtype and device moves keep the float64 tables exact; copies and state dicts carry every
    table; an in-place edit of any table takes effect; a call under no_grad, another batch size or
    another dtype of inputs caches nothing stale."""
    _available(backend)
    case = CASES[family]
    base = {**case.base, "backend": backend}
    g = torch.Generator().manual_seed(1)
    inputs, other_batch = case.inputs(g, 6), case.inputs(g, 4)
    expected, expected_other = run(case, case.cls(**base), inputs), run(case, case.cls(**base), other_batch)
    failures = []
    changes = MODULE_CHANGES if backend != "triton" else {k: MODULE_CHANGES[k] for k in TRITON_MODULE_CHANGES}
    for kind, change in changes.items():
        module = case.cls(**base)
        run(case, module, inputs)
        changed = change(module)
        if kind == "loaded into a fresh module":
            changed = changed(case.cls(**{**base, **_other_tables(case)}))
        for label, ins, exp in (("", inputs, expected), (" (another batch size)", other_batch, expected_other)):
            problem = differences(outcome(case, lambda: changed, ins), exp)
            if problem:
                failures.append(f"{kind}{label}: {problem}")
    # Every table of the state dict edited in place (its first number + 1, e.g. a weight or a part's
    # start, and its last + 0.5), as loading the edited state dict into a fresh module gives it.
    for key in case.cls(**base).state_dict():
        module = case.cls(**base)
        run(case, module, inputs)
        with torch.no_grad():
            numbers = getattr(module, key).view(-1)
            numbers[0] += 1.0
            numbers[-1] += 0.5
        edited = case.cls(**base)
        edited.load_state_dict(module.state_dict())
        problem = differences(outcome(case, lambda: module, inputs), outcome(case, lambda: edited, inputs))
        if problem:
            failures.append(f"{key} edited in place: {problem}")
    if backend == "triton":
        assert not failures, "\n".join(failures)
        return
    module = case.cls(**base)
    with torch.no_grad():
        case.call(module, *[x for x, _ in inputs])
    problem = differences(run(case, module, inputs), expected)
    if problem:
        failures.append(f"first call under no_grad: {problem}")
    float32 = [(x.float(), grad) for x, grad in inputs]
    run(case, module, float32)
    problem = differences(run(case, module, inputs), expected)
    if problem:
        failures.append(f"after a float32 call: {problem}")
    assert not failures, "\n".join(failures)


def _other_tables(case) -> dict:
    """The base configuration with other numbers in every table (what loading must overwrite)."""
    return {n: v * 2 + 1 for n, v in case.base.items() if isinstance(v, torch.Tensor)} | {
        n: _scale_reals(v) for n, v in case.base.items() if isinstance(v, (float, Mapping))}


def test_every_module_and_argument_is_covered():
    """Every public loss module is a case here, and every constructor argument has a recipe."""
    modules = {getattr(fusedloss, n) for n in fusedloss.__all__ if isinstance(getattr(fusedloss, n), type)
               and issubclass(getattr(fusedloss, n), torch.nn.Module)}
    assert modules == {c.cls for c in CASES.values()}
    for case in CASES.values():
        hints = _annotations(case.cls)
        for name, parameter in _parameters(case.cls).items():
            assert name in hints, f"{case.cls.__name__}({name}) has no annotation"
            alternatives(hints[name], case.base.get(name, parameter.default), object())


@pytest.mark.parametrize("family", list(CASES))
def test_state_dicts_saved_before_the_tables_load(family):
    """A state dict saved when the tables were not in it yet (module version 1, e.g. a Lightning
    checkpoint of a model holding a loss) loads strictly and leaves the tables as they are; one of
    version 2 missing a table is refused."""
    case = CASES[family]
    parent = torch.nn.Module()
    parent.linear, parent.loss_fn = torch.nn.Linear(2, 2), case.cls(**case.base, backend="reference")
    saved = parent.state_dict()
    old = type(saved)((k, v) for k, v in saved.items() if not k.startswith("loss_fn."))
    old._metadata = {k: dict(v) for k, v in saved._metadata.items()}
    old._metadata["loss_fn"]["version"] = 1
    before = {k: v.clone() for k, v in parent.loss_fn.state_dict().items()}
    parent.load_state_dict(old)
    assert all(torch.equal(parent.loss_fn.state_dict()[k], v) for k, v in before.items())
    old._metadata["loss_fn"]["version"] = 2
    with pytest.raises(RuntimeError, match="Missing key"):
        parent.load_state_dict(old)


@pytest.mark.parametrize("family", list(CASES))
def test_a_table_edited_in_place_to_an_invalid_number_raises_at_the_next_call(family):
    """A number of the configuration edited in place into something no assignment accepts (NaN)
    raises at the next call, naming the table, as assigning it would; it is never computed with."""
    _available("cpu")
    case = CASES[family]
    module = case.cls(**{**case.base, "backend": "cpu"})
    g = torch.Generator().manual_seed(2)
    inputs = case.inputs(g, 6)
    run(case, module, inputs)
    name = module._CONFIG_TABLES[0]
    with torch.no_grad():
        getattr(module, name).view(-1)[-1] = float("nan")
    with pytest.raises(ValueError, match=name):
        run(case, module, inputs)
