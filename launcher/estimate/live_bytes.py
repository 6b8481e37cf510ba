"""A dispatch mode that counts the bytes of every tensor storage alive, by category and phase.

Used under `FakeTensorMode` by `launcher.estimate.trace`: nothing is allocated, but every op's
outputs carry their real sizes, so the count is what a device allocator would have to hold
(without its rounding and fragmentation). A storage is counted once however many views share it,
and uncounted when Python frees it (a weak reference's callback), as the caching allocator would
get the block back.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

KINDS = ("params", "buffers", "grads16", "grads32", "master", "adam", "activations", "temporaries")
"""What a storage holds: 16-bit weights, the modules' buffers (rotary frequencies, masks), 16-bit gradients, the fp32 gradient buffer, fp32 master
weights, Adam's moments, tensors made in forward (kept for backward or not), tensors made in
backward or the optimizer step (gradients of activations, recomputed blocks, scratch)."""


class LiveBytes(TorchDispatchMode):
    """Live bytes per kind after every op: `timeline` holds (phase, bytes per kind in `KINDS`
    order), so peaks can be taken afterwards for any layout's weights (`peaks`)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = dict.fromkeys(KINDS, 0)
        self.phase = "setup"
        self.default = "params"
        """The kind of a storage an op creates now (the phase decides it)."""
        self.timeline: list[tuple[str, tuple[int, ...]]] = []
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}

    def track(self, t: torch.Tensor, kind: str | None = None) -> None:
        """Count `t`'s storage (as `kind`, or the phase's default); with `kind`, re-label it."""
        st = t.untyped_storage()
        info = self._info.get(st)
        if info is None:
            info = [kind or self.default, st.nbytes()]
            self._info[st] = info
            ref = weakref.ref(st, partial(self._freed, info))
            self._refs[id(ref)] = ref
            self.now[info[0]] += info[1]
        elif kind is not None and info[0] != kind:
            self.now[info[0]] -= info[1]
            info[0] = kind
            self.now[kind] += info[1]

    def _freed(self, info: list, ref: weakref.ref) -> None:
        self.now[info[0]] -= info[1]
        self._refs.pop(id(ref), None)

    def snapshot(self) -> None:
        self.timeline.append((self.phase, tuple(self.now.values())))

    def set_phase(self, phase: str, default: str) -> None:
        self.snapshot()
        self.phase, self.default = phase, default

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.snapshot()
        return out


def peaks(timeline: list[tuple[str, tuple[int, ...]]], weights: dict[str, float],
          phases: tuple[str, ...]) -> dict[str, tuple[int, dict[str, int]]]:
    """Per phase: (highest weighted total, weighted bytes per kind at that moment). A weight is one
    rank's share of a kind (ZeRO partitions), 0 for what offload keeps off the GPU; the peak is
    found at the moment it happens in that layout, not in the unpartitioned step."""
    w = [weights.get(k, 1.0) for k in KINDS]
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for phase, snap in timeline:
        if phase not in phases:
            continue
        total = sum(x * y for x, y in zip(w, snap))
        if phase not in out or total > out[phase][0]:
            out[phase] = (int(total), {k: int(x * y) for k, x, y in zip(KINDS, w, snap)})
    return out
