"""The loader: choose the container, plan, then apply the plan to a module, all or nothing.

:func:`plan` decides everything from names, shapes and dtypes (no tensor bytes read).
:func:`load` applies a plan: every source tensor is first obtained as a view of the
memory-mapped file (so a failure leaves the model untouched), then copied into the model's
own tensors in place (parameter identity, ``requires_grad`` and device kept), or into new
private tensors for parameters that live on the meta device (:func:`build`; zero-copy views
of the file only with ``build(mmap=True)``). Every zip record read is CRC-32 checked, fused
with the copy, and a failure part way (I/O error, CRC mismatch) is rolled back (:class:`~.copying.Rollback`).

The package, in the order a load runs through it:

- :mod:`.options`: the user's options, checked before any work;
- :mod:`.planning`: the model's tensors (:class:`~.planning.Target`), the state dict chosen in
  the file and the plan for it (:func:`plan`);
- :mod:`.copying`: the copy engine (reads, CRC-32 checks, rollback);
- :mod:`.materialising`: meta tensors made real (loaded ones assigned, the others initialised);
- :mod:`.meta`: building a model with its parameters on the meta device (:func:`build`);
- :mod:`.distributed`: loading into sharded models (FSDP2, DTensor, DDP);
- :mod:`.loader`: the verbs :func:`open`, :func:`load` and :func:`build`.
"""
from .loader import build as build
from .loader import load as load
from .loader import open as open  # noqa: A004 - public verb
from .planning import Source as Source
from .planning import plan as plan

__all__ = ["open", "plan", "load", "build", "Source"]
