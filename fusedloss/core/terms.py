"""The dict of named terms a loss returns, made only when it is read.

A fused forward returns its terms as one tensor; making one 0-dim view per term costs about a
microsecond each (Ditto's loss has 18 to 30 terms), which a training step that only
backpropagates the total would pay on every call. ``Terms`` is a mutable mapping with the same
keys, values and order as the dict it stands for; the views are made (with one ``unbind``) the
first time a value is read, and the mapping then behaves as that dict. ``Terms(mapping)``
builds one like ``dict(mapping)`` (as DataParallel's gather and Lightning rebuild mappings), and
torch's pytree flattens it as a dict. It is not a ``dict`` subclass: ``dict(terms)`` makes one.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch


class Terms(MutableMapping):
    """``{name: 0-dim tensor}`` for ``names`` and the rows of ``values``, then ``extra``."""

    __slots__ = ("_names", "_values", "_extra", "_dict")

    def __init__(self, names=(), values: torch.Tensor | None = None, extra: dict | None = None) -> None:
        if values is None:  # Terms(mapping or pairs), as dict(...): how generic code rebuilds a mapping
            self._names, self._values, self._extra, self._dict = (), None, None, dict(names)
            return
        self._names = names
        self._values = values
        self._extra = extra
        self._dict = None

    def _items(self) -> dict:
        items = self._dict
        if items is None:
            # The views get the grad mode of the forward, not of the first read (e.g. logging
            # under no_grad before the terms are summed and backpropagated).
            with torch.inference_mode(False), torch.enable_grad():
                items = dict(zip(self._names, self._values.unbind(0)))
            if self._extra:
                items.update(self._extra)
            self._dict = items
        return items

    def __getitem__(self, name):
        return self._items()[name]

    def __setitem__(self, name, value) -> None:
        self._items()[name] = value

    def __delitem__(self, name) -> None:
        del self._items()[name]

    def __iter__(self):
        if self._dict is not None:
            return iter(self._dict)
        return iter(self._names + tuple(self._extra or ()))

    def __len__(self) -> int:
        if self._dict is not None:
            return len(self._dict)
        return len(self._names) + len(self._extra or ())

    def __contains__(self, name) -> bool:
        if self._dict is not None:
            return name in self._dict
        return name in self._names or name in (self._extra or ())

    def __eq__(self, other):
        return dict(self._items()) == other

    def __repr__(self) -> str:
        return repr(self._items())

    def copy(self) -> dict:
        return dict(self._items())

    def __reduce__(self):
        return dict, (self._items(),)


def _flatten(terms: Terms):
    items = terms._items()
    return list(items.values()), list(items.keys())


def _unflatten(values, keys) -> Terms:
    return Terms(zip(keys, values))


torch.utils._pytree.register_pytree_node(
    Terms, _flatten, _unflatten, serialized_type_name="fusedloss.core.terms.Terms",
    flatten_with_keys_fn=lambda terms: ([(torch.utils._pytree.MappingKey(k), v) for k, v in terms._items().items()],
                                        list(terms._items().keys())),
)


def terms_of(names: tuple[str, ...], values: torch.Tensor, extra: dict | None = None):
    """The named rows of ``values`` (then ``extra``): made lazily in eager mode (``Terms``), a plain
    dict under torch.compile."""
    return terms_maker()(names, values, extra)


def _terms_dict(names: tuple[str, ...], values: torch.Tensor, extra: dict | None = None) -> dict:
    out = dict(zip(names, values.unbind(0)))
    if extra:
        out.update(extra)
    return out


def terms_maker():
    """What makes a call's terms mapping, chosen once when its plan is made: ``Terms`` in eager
    mode, a plain dict while torch.compile traces."""
    return _terms_dict if torch.compiler.is_compiling() else Terms
