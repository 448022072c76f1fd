"""Domain errors. No HTTP in here: service/app.py maps each class to a status code once."""

from __future__ import annotations


class NormserveError(Exception):
    """Base of every error the service raises on purpose; the message is safe to show."""


class RepositoryError(NormserveError, ValueError):
    """The model repository is malformed: a config that does not validate, a missing file."""


class IntegrityError(RepositoryError):
    """A model file's sha256 differs from the one recorded at export."""
