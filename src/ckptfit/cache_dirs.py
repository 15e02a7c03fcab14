"""Where ckptfit keeps files between runs: one root, one subfolder per use.

The root is ``$CKPTFIT_CACHE``, else ``$XDG_CACHE_HOME/ckptfit``, else ``~/.cache/ckptfit``. Under it,
``remote/`` holds fetched files (:mod:`ckptfit._remote`) and ``identify/`` the signature index
(:mod:`ckptfit.identification.cache`). ``$CKPTFIT_CACHE_DIR``, which once set the identify index
alone, still works when ``$CKPTFIT_CACHE`` is unset, with a :class:`DeprecationWarning`.
"""
from __future__ import annotations

import os
import warnings

__all__ = ["cache_root", "cache_dir", "REMOTE", "IDENTIFY"]

REMOTE = "remote"  # fetched files, one folder per content (ckptfit._remote)
IDENTIFY = "identify"  # the identify signature index, one folder per library versions


def cache_root() -> str:
    """The folder ckptfit caches in: ``$CKPTFIT_CACHE``, ``$XDG_CACHE_HOME/ckptfit`` or ``~/.cache/ckptfit``.

    Example:
        >>> import os
        >>> os.environ["CKPTFIT_CACHE"] = "/tmp/ckptfit-cache"
        >>> cache_root()
        '/tmp/ckptfit-cache'
    """
    root = os.environ.get("CKPTFIT_CACHE")
    if not root:
        root = os.environ.get("CKPTFIT_CACHE_DIR")
        if root:
            warnings.warn("CKPTFIT_CACHE_DIR is deprecated; set CKPTFIT_CACHE (one cache folder for the identify "
                          "index and fetched files)", DeprecationWarning, stacklevel=2)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "ckptfit")
    return root


def cache_dir(use: str) -> str:
    """The subfolder of :func:`cache_root` for one use (:data:`REMOTE`, :data:`IDENTIFY`)."""
    return os.path.join(cache_root(), use)
