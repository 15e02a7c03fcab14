"""Which known architecture, with which constructor arguments, produced a bare state dict.

:func:`identify` looks at names and shapes only. It compares the checkpoint's state dict with
*signatures*: the ``(key, shape)`` lists of known models built on the meta device (no weights,
no downloads, no random init):

- every torchvision classification, video, detection and segmentation builder,
- every timm architecture in ``timm.list_models()`` (base names, no pretrained tags),
- common Hugging Face transformers families (BERT, GPT-2, Llama, T5 ...), whose sizes
  (hidden size, layers, heads, vocabulary) are read from the shapes.

Models are built with a sentinel ``num_classes`` (1009, a prime no layer width uses), so the
tensors a classifier head owns are known and ``num_classes`` can be read from the checkpoint's
shapes. Each comparison goes through :func:`ckptfit.matching.match`, the reconciliation
:func:`ckptfit.load` uses, so ``module.`` / ``model.`` prefixes (DataParallel, Lightning) and
the file's container choice are handled alike.

The signature index is cached on disk under ``identify/`` in ckptfit's cache (``$CKPTFIT_CACHE``,
else ``$XDG_CACHE_HOME/ckptfit``, else ``~/.cache/ckptfit``), keyed by the library versions, and
grows incrementally: torchvision is indexed in full on first use (~10 s); timm's ~1,300
architectures are grouped by module and name stem, one representative per group is indexed
(~1 min on 2 cores, once), and a group is indexed in full only when a checkpoint resembles
it. :func:`build_index` indexes everything up front.

The package: :mod:`.results` (what :func:`identify` returns), :mod:`.cache` (the on-disk index),
:mod:`.signatures` (building signatures of torchvision and timm models), :mod:`.scoring`
(comparing one with the checkpoint), :mod:`.hf` (Hugging Face families, sizes read from shapes)
and :mod:`.search` (:func:`identify` and :func:`build_index`).
"""
from .cache import cache_dir as cache_dir
from .results import Candidate as Candidate
from .results import Identification as Identification
from .search import build_index as build_index
from .search import identify as identify

__all__ = ["identify", "Identification", "Candidate", "build_index", "cache_dir"]
