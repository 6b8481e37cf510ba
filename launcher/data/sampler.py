"""A distributed sampler whose position is explicit, resumable state.

Each epoch has one global order: a permutation of the example indices seeded by seed + epoch
(as torch's DistributedSampler does). Global position p of the epoch goes to rank p % W, so rank
r takes positions consumed + r, consumed + r + W, ... The state is the number of samples the
ranks have taken together (`consumed`), not a per-rank offset, so a checkpoint written with W
ranks resumes with any other number: the next global positions are dealt out to the new ranks,
nothing skipped or repeated (provided `consumed` is a multiple of the old W, which it is when
every rank has taken the same number of samples, i.e. at any optimizer step).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler:
    """Example indices for one rank. Iterating updates `consumed` as indices are yielded.

    When an index is handed out, `consumed` already counts it: after this rank has taken k
    indices from an iterator started at `start`, consumed == start + k * num_replicas, which is
    what all ranks have taken together when they move in lockstep. So `state_dict()` at a
    checkpoint records exactly what was used, and `load_state_dict` seeks there (no replay).

    Use one live iterator at a time (`it = iter(sampler)`, `next(it)` per sample), and do not put
    it behind a prefetching DataLoader, whose read-ahead would count as consumed. When it is
    exhausted, call `set_epoch(epoch + 1)` and iterate again. `set_epoch` restarts the epoch at
    consumed=0: after `load_state_dict`, do not call it for the resumed epoch.

    With `drop_last`, the tail of the epoch that cannot be dealt out evenly is dropped; without,
    the order wraps around to its start so that every rank gets the same count.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_examples < 1:
            raise ValueError("the sampler needs at least one example")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_examples = num_examples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) cache

    def order(self) -> list[int]:
        """The current epoch's global order of example indices."""
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                perm = torch.randperm(self.num_examples, generator=g).tolist()
            else:
                perm = list(range(self.num_examples))
            self._order = (self.epoch, perm)
        return self._order[1]

    def _remaining(self, consumed: int) -> int:
        left = max(0, self.num_examples - consumed)
        if self.drop_last:
            return left // self.num_replicas
        return -(-left // self.num_replicas)  # ceil: the last round wraps around

    def __len__(self) -> int:
        """Indices this rank has left in the current epoch."""
        return self._remaining(self.consumed)

    def __iter__(self) -> Iterator[int]:
        start, world = self.consumed, self.num_replicas
        order = self.order()
        for k in range(self._remaining(start)):
            self.consumed = start + (k + 1) * world
            yield order[(start + self.rank + k * world) % self.num_examples]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (consumed = 0)."""
        self.epoch = epoch
        self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Seek to a saved position; the saved num_replicas does not matter."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
