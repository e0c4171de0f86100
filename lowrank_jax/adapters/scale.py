"""The LoRA scale ``s`` (``W' = W + s A B``) and which leaves are ``A`` and ``B``, in one place.

``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), with ``alpha`` per target path from
``alpha_pattern``; ``A`` and ``B`` are the leaves whose roles are ``("stack", "in", "rank")``
and ``("stack", "rank", "out")``. LoRA, DoRA, the LoRA optimizers and export read them here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["LORA_FACTORS", "lora_factor_names", "lora_scale", "roles_or_lora", "target_scale"]

#: The default names of LoRA's factors (``lrj.lora``'s leaves), for trees made without an adapter at hand.
LORA_FACTORS = ("a", "b")


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """``s = alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA.

    >>> lora_scale(4, 8.0), lora_scale(4, 8.0, rslora=True)
    (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def target_scale(config: Mapping, path: str, rank: int) -> float:
    """The scale of the target at ``path`` (``"/"``-joined keys) with rank ``rank``, from an adapter's config.

    Reads ``config["alpha"]``, ``config["alpha_pattern"]`` (``{path regex: alpha}``, first
    full match wins) and ``config["rslora"]``; the last two may be absent.

    >>> target_scale({"alpha": 8.0, "alpha_pattern": {".*/v/kernel": 2.0}}, "params/v/kernel", 4)
    0.5
    """
    if "alpha" not in config:
        raise ValueError(f"adapter {config.get('method')!r} has no `alpha` in its config, so it has no LoRA scale")
    alpha = tree_lib.first_match(config.get("alpha_pattern"), path, config["alpha"])
    return lora_scale(int(rank), alpha, bool(config.get("rslora", False)))


def roles_or_lora(adapter: base.Adapter | None) -> dict:
    """``adapter``'s leaf roles (:func:`base.roles_of`), LoRA's when there is no adapter or it declares none."""
    return base.roles_of(adapter) if adapter is not None and adapter.roles else dict(base.LORA_ROLES)


def lora_factor_names(adapter: base.Adapter | None = None) -> tuple[str, str]:
    """``(A, B)``: the names of the leaves whose roles are ``("stack", "in", "rank")`` and ``("stack", "rank", "out")``.

    Without an adapter (or one declaring no roles), LoRA's ``("a", "b")``. Raises when the
    adapter's roles do not name exactly one leaf of each kind.
    """
    if adapter is None or not adapter.roles:
        return LORA_FACTORS
    roles = base.roles_of(adapter)
    found = [[n for n, leaf in roles.items() if leaf.axes == base.LORA_ROLES[k].axes] for k in LORA_FACTORS]
    if any(len(names) != 1 for names in found):
        patterns = {n: leaf.axes for n, leaf in roles.items()}
        raise ValueError(
            f"adapter {adapter.config.get('method', '?')!r} has no single pair of LoRA factors: its leaf roles {patterns} "
            f"should hold one leaf {base.LORA_ROLES['a'].axes} and one {base.LORA_ROLES['b'].axes}"
        )
    return found[0][0], found[1][0]
