"""The one mechanism by which gradpower-ds changes third-party code: listed, version-checked, reversible.

Each integration (``gradpower_ds.deepspeed``, ``megatron_patches``) is a ``PatchSet``:
the package it patches, the versions it supports, and a function returning the list
of its patches, each one of three kinds:

    Wrap(owner, name, factory)    owner.name = factory(original)
    Add(owner, name, value)       owner.name = value, an attribute the owner did not have
    Extend(registry, items)       items appended to a list the package keeps (e.g. its optimizer names)

``apply()`` checks the installed version against the tested range
(``UnsupportedVersionError`` naming both and what to install; with
``GRADPOWER_ALLOW_UNTESTED=1`` one warning instead, and the patches are applied anyway),
applies the patches in order and keeps how to undo each; a failure part-way undoes
the ones applied. ``remove()`` undoes them in reverse order. Both are idempotent;
``describe()`` lists what is patched. Nothing is patched at import.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from packaging.version import Version

from .versions import requirement_for

ALLOW_UNTESTED = "GRADPOWER_ALLOW_UNTESTED"  # =1: patch a version outside the tested range, with a warning

_log = logging.getLogger(__name__)


class UnsupportedVersionError(RuntimeError):
    """The installed package is not a version these patches were written and tested for."""


@dataclass(frozen=True)
class Package:
    """A patched package: its display name, the module holding ``__version__``, its pip name, and the tested
    versions, ``oldest`` through ``newest`` (both tested, both included)."""

    name: str
    module: str
    dist: str
    oldest: str
    newest: str

    @property
    def supported(self) -> str:
        """The tested range as people write it: '0.19.8' or '0.16.0 through 0.19.8'."""
        return self.oldest if self.oldest == self.newest else f"{self.oldest} through {self.newest}"

    @property
    def requirement(self) -> str:
        """The pip requirement for the tested range."""
        return requirement_for(self.dist, self.oldest, self.newest)

    def installed(self) -> str:
        """The installed version (``module.__version__``)."""
        return importlib.import_module(self.module).__version__

    def installed_at_least(self, version: str) -> bool:
        """Whether the installed version is `version` or newer: the test of a feature's first version."""
        return Version(Version(self.installed()).base_version) >= Version(version)

    def is_tested(self, version: str) -> bool:
        """Whether `version` lies in the tested range (local build tags such as +cu130 ignored)."""
        release = Version(Version(version).base_version)
        return Version(self.oldest) <= release <= Version(self.newest)


@dataclass(frozen=True)
class Wrap:
    """Replaces ``owner.name`` (a class or module attribute) by ``factory(original)``."""

    owner: Any
    name: str
    factory: Callable

    def apply(self) -> Callable[[], None]:
        """Applies the patch; returns the function that undoes it."""
        own = not isinstance(self.owner, type) or self.name in vars(self.owner)
        original = vars(self.owner)[self.name] if isinstance(self.owner, type) and own \
            else getattr(self.owner, self.name)
        setattr(self.owner, self.name, self.factory(original))
        if own:
            return lambda: setattr(self.owner, self.name, original)
        return lambda: delattr(self.owner, self.name)  # it was inherited: inherit it again

    def describe(self) -> str:
        return f"{_qualname(self.owner)}.{self.name} wrapped by {_qualname(self.factory)}"


@dataclass(frozen=True)
class Add:
    """Gives ``owner`` a new attribute ``name`` = ``value``; refuses to replace one it has."""

    owner: Any
    name: str
    value: Any

    def apply(self) -> Callable[[], None]:
        """Applies the patch; returns the function that undoes it."""
        if hasattr(self.owner, self.name):
            raise RuntimeError(f"{_qualname(self.owner)} already has {self.name}; not patching over it")
        setattr(self.owner, self.name, self.value)
        return lambda: delattr(self.owner, self.name)

    def describe(self) -> str:
        return f"{_qualname(self.owner)}.{self.name} = {self.value!r} added"


@dataclass(frozen=True)
class Extend:
    """Appends ``items`` to the list ``registry`` (in place, so every module that imported it sees them)."""

    registry: list
    items: tuple
    label: str

    def apply(self) -> Callable[[], None]:
        """Applies the patch; returns the function that undoes it."""
        self.registry.extend(self.items)

        def undo() -> None:
            for item in self.items:
                self.registry.remove(item)

        return undo

    def describe(self) -> str:
        return f"{self.label} += {[getattr(i, '__name__', i) for i in self.items]}"


class PatchSet:
    """The patches of one integration to one package, applied and removed together."""

    def __init__(self, owner: str, package: Package, reason: str, patches: Callable[[], list],
                 error: type[UnsupportedVersionError] = UnsupportedVersionError):
        self.owner, self.package, self.reason, self.error = owner, package, reason, error
        self._patches = patches
        self._undo: list[Callable[[], None]] = []
        self._applied: list[str] = []
        self._warned = False

    def check_version(self) -> None:
        """Raises ``error`` (an UnsupportedVersionError) unless the installed package is in the tested range; with
        GRADPOWER_ALLOW_UNTESTED=1 it logs one warning instead (once per process)."""
        package, installed = self.package, self.package.installed()
        if package.is_tested(installed):
            return
        only = " only" if package.oldest == package.newest else ""
        message = (f"{self.owner} supports {package.name} {package.supported}{only} ({self.reason}), but "
                   f"{package.name} {installed} is installed")
        if os.environ.get(ALLOW_UNTESTED) == "1":
            if not self._warned:
                self._warned = True
                _log.warning("%s; patching it anyway because %s=1: results are untested", message, ALLOW_UNTESTED)
            return
        raise self.error(f"{message}: pip install \"{package.requirement}\" (or set {ALLOW_UNTESTED}=1 to try "
                         "this version anyway, untested)")

    def is_applied(self) -> bool:
        """Whether apply() is in effect."""
        return bool(self._undo)

    def apply(self) -> None:
        """Checks the version and applies every patch (idempotent); a failure undoes the patches applied so far."""
        if self.is_applied():
            return
        self.check_version()
        undo, applied = [], []
        try:
            for patch in self._patches():
                undo.append(patch.apply())
                applied.append(patch.describe())
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        self._undo, self._applied = undo, applied

    def remove(self) -> None:
        """Undoes apply() in reverse order; a no-op when not applied."""
        while self._undo:
            self._undo.pop()()
        self._applied = []

    def describe(self) -> list[str]:
        """One line per patch in effect (empty when not applied)."""
        return list(self._applied)


def _qualname(obj) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__


__all__ = ["ALLOW_UNTESTED", "Add", "Extend", "Package", "PatchSet", "UnsupportedVersionError", "Wrap"]
