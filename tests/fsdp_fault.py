"""`flashlm.train` under torchrun with one bug planted on purpose, to show that the FSDP2 test's weight
comparison catches it (tests/test_train.py). Usage, as torchrun's script:

    FLASHLM_FAULT=<name> torchrun --nproc-per-node 2 tests/fsdp_fault.py <flashlm train flags>

Faults (each touches rank 1 only, so rank 0 runs exactly as a correct run would):
- ``half_grad``: rank 1's gradient is halved before the reduce-scatter (a wrong reduction weight,
  e.g. a world-size factor applied on one rank only);
- ``wrong_shard``: rank 1 reads rank 0's rows (a data shard bug: half the global batch is seen twice
  and the other half never).
"""

import os
import sys

import torch

from flashlm import train as T
from flashlm.train import data as fdata
from flashlm.train import loop


def _half_grad() -> None:
    apply_fsdp = loop.apply_fsdp  # the name the run calls

    def faulty(model, bf16):
        apply_fsdp(model, bf16)
        if torch.distributed.get_rank() == 1:
            # The gradient of the logits scales the whole backward of this rank.
            model.lm_head.register_full_backward_pre_hook(lambda _m, grads: tuple(0.5 * g for g in grads))

    loop.apply_fsdp = faulty


def _wrong_shard() -> None:
    class RankZeroRows(fdata.DataIterator):
        def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, shuffle=True):
            super().__init__(dataset, batch_size, seed=seed, rank=0, world_size=world_size, shuffle=shuffle)

    fdata.DataIterator = RankZeroRows


FAULTS = {"half_grad": _half_grad, "wrong_shard": _wrong_shard}

if __name__ == "__main__":
    FAULTS[os.environ["FLASHLM_FAULT"]]()
    sys.exit(T.main(sys.argv[1:]))
