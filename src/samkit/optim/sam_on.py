"""SAM-ON: SAM on the normalisation layers only (Mueller et al., NeurIPS 2023).

"Normalization Layers Are All That Sharpness-Aware Minimization Needs": perturbing only the
affine parameters (weight and bias) of the normalisation layers, with the norm of ``e`` taken over
them alone, matches or beats SAM perturbing everything. With ``N`` the normalisation parameters:

    g      = grad L(w)                                  first pass
    e_N    = rho * g_N / (||g_N||_2 + eps),  e_other = 0
    g_sam  = grad L(w + e)                              second pass, all parameters
    w      = O(w, g_sam)                                every parameter is updated

SAM-ON is plain :class:`~samkit.optim.SAM` over the param groups :func:`sam_on_groups` builds:
one with the normalisation parameters, one with ``perturb=False`` holding everything else (SAM's
per-group option: not perturbed, not in the norm, still updated). ASAM (``adaptive=True``) and
the other options act on the perturbed group as usual::

    opt = SAM(sam_on_groups(model), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt = create_optimizer("sam_on", model, torch.optim.SGD, rho=0.05, lr=0.1)  # the same

Far fewer parameters move than with SAM, so tune rho for SAM-ON on its own rather than reusing
SAM's. A step costs SAM's two passes, but the first backward needs only the normalisation
parameters' gradients: ``samkit.train.SharpnessAwareStep`` runs it without the others' weight
gradients (:func:`unperturbed_frozen`), and the copy of the clean weights is smaller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["NORM_LAYERS", "sam_on_groups", "unperturbed_frozen"]

#: The layer types whose parameters SAM-ON perturbs (subclasses included: timm's
#: ``BatchNormAct2d``, ``LayerNorm2d`` and ``GroupNormAct`` derive from these; its ``RmsNorm``,
#: ``EvoNorm*`` and ``FilterResponseNorm*`` do not: pass them in ``norm_types``).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def sam_on_groups(
    model: nn.Module, norm_types: tuple[type[nn.Module], ...] = NORM_LAYERS
) -> list[dict[str, Any]]:
    """SAM-ON's param groups of ``model``: ``[{"params": <normalisation parameters>},
    {"params": <the others>, "perturb": False}]`` (the second left out when empty).

    The normalisation parameters are those held directly by modules of ``norm_types`` (a
    parameter tied to one of them counts as one); every parameter of ``model`` appears once, and
    both groups keep ``model.parameters()`` order. ValueError when the model has no such
    parameter: SAM-ON would perturb nothing (pass your own layer types in ``norm_types``).
    """
    norm_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, norm_types)
        for p in module.parameters(recurse=False)
    }
    norm: list[Tensor] = []
    other: list[Tensor] = []
    for p in model.parameters():  # unique, in registration order
        (norm if id(p) in norm_ids else other).append(p)
    if not norm:
        names = ", ".join(t.__name__ for t in norm_types)
        raise ValueError(
            f"SAM-ON: {type(model).__name__} has no parameters in normalisation layers ({names}), "
            "so nothing would be perturbed; pass the model's normalisation layer types as "
            "sam_on_groups(model, norm_types=(...))"
        )
    groups: list[dict[str, Any]] = [{"params": norm}]
    if other:
        groups.append({"params": other, "perturb": False})
    return groups


@contextlib.contextmanager
def unperturbed_frozen(optimizer: Any, *, local: bool) -> Iterator[None]:
    """Inside the block the parameters of ``optimizer``'s ``perturb=False`` groups do not require
    grad, so a first backward run in it skips their weight gradients, which the step never reads
    (the ascent uses the perturbed groups' gradients, the update the second pass's).

    A no-op unless the first pass is ``local`` (not all-reduced: DDP's reducer expects every
    gradient) and the step never updates with the first pass's gradients: not GSAM or WSAM (they
    combine them into the update), no ``ascent_policy`` (a step without ascent is a base step on
    them), not Momentum-SAM (its one pass is the update's); and with no flat buffers
    (``flat=True`` refuses frozen parameters)."""
    frozen = []
    if (
        local
        and not optimizer.stores_clean_gradient
        and optimizer.ascent_policy is None
        and not optimizer.perturbs_before_first_pass
        and getattr(optimizer, "_flat", None) is None
    ):
        frozen = [
            p
            for g in optimizer.param_groups
            if not g.get("perturb", True)
            for p in g["params"]
            if p.requires_grad
        ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
