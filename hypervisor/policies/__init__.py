"""Automatic ballooning policies and :func:`load_policy`.

Built in: ``none`` (manual only), ``static`` (fixed targets), ``mom`` (oVirt MoM's balloon
rules) and ``share`` (ESX shares with an idle memory tax). A topology may instead name a user
policy as ``package.module:Class``, a subclass of :class:`Policy`. See docs/policies.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from .base import Decision, HostSample, Policy, VmSample
from .mom import MomPolicy
from .none import NonePolicy
from .share import SharePolicy
from .static import StaticPolicy

__all__ = [
    "BUILTIN_POLICIES",
    "Decision",
    "HostSample",
    "MomPolicy",
    "NonePolicy",
    "Policy",
    "SharePolicy",
    "StaticPolicy",
    "VmSample",
    "load_policy",
]

BUILTIN_POLICIES: Mapping[str, type[Policy]] = {
    cls.name: cls for cls in (NonePolicy, StaticPolicy, MomPolicy, SharePolicy)
}


def resolve_policy_class(spec: str) -> type[Policy]:
    """The Policy subclass named by a built-in name or ``package.module:Class``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"policy must be a non-empty string, got {spec!r}")
    if spec in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[spec]
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name or ":" in class_name:
        raise ValueError(
            f"unknown policy {spec!r}: use one of {', '.join(BUILTIN_POLICIES)} "
            f"or 'package.module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"policy {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise ValueError(
            f"policy {spec!r}: module {module_name!r} has no attribute {class_name!r}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ValueError(
            f"policy {spec!r}: {class_name!r} is not a subclass of "
            f"hypervisor.policies.Policy"
        )
    return cls


def load_policy(spec: str, params: Mapping[str, object] | None = None) -> Policy:
    """Instantiate the policy named by ``spec`` with ``params``.

    ``spec`` is ``none``, ``static``, ``mom``, ``share`` or ``package.module:Class``. Raises
    ``ValueError`` naming the spec when it cannot be resolved, and the policy's own
    ``ValueError`` when a parameter is unknown or out of range.
    """
    cls = resolve_policy_class(spec)
    if getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ValueError(f"policy {spec!r}: {cls.__name__} does not implement {missing}()")
    return cls(params)
