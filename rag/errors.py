"""The document store's errors; rag.store re-exports them (``from rag.store import RagError``)."""
from __future__ import annotations


class RagError(Exception):
    """A document-store problem worth one line to the user."""


class StoreLocked(RagError):
    """Another process owns the store."""


class StoreDamaged(RagError):
    """A store file is damaged; `damage` says which (rag.verify.Damage)."""

    def __init__(self, message: str, damage: list):
        super().__init__(message)
        self.damage = damage
