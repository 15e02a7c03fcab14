"""The matcher: which checkpoint tensor goes into which model tensor, and why.

:func:`match` is pure: it sees names, shapes and dtypes (:class:`~ckptfit.plans.TensorSpec`),
never tensor data, and returns a :class:`~ckptfit.plans.Plan` with one decision per model
tensor. It runs in stages, each of which only looks at what the earlier ones left:

1. **rule**: the user's ``rename=`` regexes rewrite checkpoint keys; ``include=`` /
   ``exclude=`` globs restrict what is loaded.
2. **exact**: same name.
3. **prefix**: leading segments stripped, added or replaced (``module.``, ``_orig_mod.``,
   ``backbone.body.`` ...), learned from the two key sets, never taken from a fixed list.
4. **structural**: old key styles (``norm.1`` vs ``norm1``) and modules whose names differ
   entirely. Roles and shapes are constraints; names (``q`` ~ ``query``, ``down`` ~
   ``downsample``) and declaration order are evidence. Look-alike modules are paired by name
   where the names settle it, by order only where the names do not contradict it, and
   otherwise refused with the ``rename=`` that would load them; each decision says which
   evidence carried it (``Decision.evidence``).
5. **shapes / dtypes**: a tensor of another shape or another dtype kind is never loaded.
6. **harmless**: ``num_batches_tracked``, tied weights, optional keys.
7. **strictness**: whatever is left is ``missing`` (a problem) or, under ``partial=True``,
   kept at its init.

The guiding rule is that a wrong mapping is worse than none: where two explanations fit
equally well, nothing is loaded through either and a ``rename=`` suggestion is given.
The package, in the order a call runs through it:

- :mod:`.matcher`: :func:`match` and the :class:`~.matcher.Matcher`'s state, stages 1-3
  (rules, exact names, learned prefixes);
- :mod:`.alignment`: stage 4 (old key styles, structural alignment and its refusals);
- :mod:`.decisions`: stages 5-7 and the :class:`~ckptfit.plans.Plan` built from them;
- :mod:`.names`: what the stages read in names (tokens, synonyms, the evidence names give).
"""
from .matcher import match as match

__all__ = ["match"]
