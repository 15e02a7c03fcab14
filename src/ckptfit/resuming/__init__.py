"""Resume a training run, even after the model's code changed: weights, optimizer, schedule, RNG.

``optimizer.load_state_dict`` matches saved state to parameters by *position*. After a
rename, a reordering or a wrapper (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, a
new head) positions shift and momentum or Adam moments land on the wrong parameters, without
an error when the shapes happen to agree. :func:`resume` loads the model through the same
plan as :func:`ckptfit.load`, names every saved optimizer state by the saved model's
parameter order, and follows the plan to the parameter that now holds those weights (by
identity, never by position alone). A saved state whose shape does not fit the parameter it
would be attached to is refused; new parameters start with fresh state; the state of
parameters that no longer exist is reported.

Layouts recognised: the PyTorch tutorial dict (``model_state_dict``, ``optimizer_state_dict``,
``epoch``, ``loss``), timm ``train.py`` checkpoints (``state_dict``, ``optimizer``,
``amp_scaler``, ``epoch``), Lightning ``.ckpt`` files (``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``global_step``), Hugging Face Trainer ``checkpoint-N/`` folders
(``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``,
``trainer_state.json``), DCP folders (``torch.distributed.checkpoint``) whose optimizer state
is keyed by parameter name (``get_state_dict``, nested or flattened), and any dict holding such
parts. Every file is read by ckptfit's
restricted reader: no code from the file runs.

The package: :mod:`.reports` (what :func:`resume` returns and ``plan --resume`` shows),
:mod:`.parts` (finding the model, optimizers, schedulers, scaler and RNG states in a file or
a Trainer folder), :mod:`.optimizer` (naming saved optimizer states and following the plan to
the parameters that now hold them) and :mod:`.restore` (:func:`resume`, :func:`describe_resume`).
"""
from .reports import OptimizerMapping as OptimizerMapping
from .reports import ResumePlan as ResumePlan
from .reports import ResumeReport as ResumeReport
from .restore import describe_resume as describe_resume
from .restore import resume as resume

__all__ = ["resume", "ResumeReport", "OptimizerMapping", "ResumePlan", "describe_resume"]
