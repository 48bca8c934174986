"""Data order of a training stage that survives a resume and any number of ranks."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from segcft.distributed import Dist
from segcft.errors import UserError

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """This rank's share of an endless, seeded sequence of shuffled epochs (DistributedSampler
    order), starting ``offset`` samples into it: data order survives a resume exactly.
    The global batch of step t is the same set of samples for any number of ranks."""

    def __init__(self, n: int, d: Dist, seed: int, offset: int = 0) -> None:
        self.n, self.d, self.seed, self.offset = n, d, seed, offset

    def __iter__(self) -> Iterator[int]:
        ds: DistributedSampler[int] = DistributedSampler(
            range(self.n),  # type: ignore[arg-type]  # only its length is used
            num_replicas=self.d.world,
            rank=self.d.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        per_epoch = len(ds)
        if per_epoch == 0:
            raise UserError(f"the training split has {self.n} samples, fewer than the {self.d.world} ranks")
        epoch, skip = divmod(self.offset, per_epoch)
        while True:
            ds.set_epoch(epoch)
            yield from list(ds)[skip:]
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader needs no length
        return sys.maxsize
