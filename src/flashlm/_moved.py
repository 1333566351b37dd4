"""Old import paths of modules that moved, in ONE table: each still imports, as the new module, with a
DeprecationWarning naming where it lives now. They go in the release after next.

``import flashlm`` installs a finder ahead of the normal ones, so an old path never needs a file of its
own: ``import flashlm.losses`` returns the very module object of ``flashlm.ops.cross_entropy``
(``flashlm.losses is flashlm.ops.cross_entropy``). Every public name the old module had still imports from
it (tests/test_moved.py holds the list); private helpers and the old internal autograd Functions
(``RotaryFunction``, ``rotary_op`` of the deleted Triton rotary module) are not kept.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module path -> new module path (add a line when a module moves; tests/test_moved.py checks each)
MOVED: dict[str, str] = {
    "flashlm.attention.backends.triton.rotary": "flashlm.ops.rotary",
    "flashlm.models.default": "flashlm.models.reference",
    "flashlm.models.layers": "flashlm.models.reference",
    "flashlm.models.cache": "flashlm.models.reference",
    "flashlm.models.flash_cache": "flashlm.models.kv_cache",
    "flashlm.models.fused": "flashlm.models.weights",
    "flashlm.models.io": "flashlm.models.weights",
    "flashlm.models.flash_mixin": "flashlm.models.flash",
    "flashlm.models.flash_rope": "flashlm.models.flash",
    "flashlm.models.flash_backends": "flashlm.models.kernels",
    "flashlm.losses": "flashlm.ops.cross_entropy",
    "flashlm.loss_kernels": "flashlm.ops.cross_entropy",
    "flashlm.optim": "flashlm.ops.adamw",
    "flashlm.optim_kernels": "flashlm.ops.adamw",
    "flashlm.decode_graph": "flashlm.generation.cuda_graph",
    "flashlm.sampling": "flashlm.generation.sampling",
    "flashlm.data": "flashlm.train.data",
    "flashlm.checkpoint": "flashlm.train.checkpoint",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new}: import it from there (the old path is deprecated "
                      "and goes in the release after next)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the new module ran when it was imported
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
