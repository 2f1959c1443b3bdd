"""Errors that tell the router to send a request elsewhere, without counting it as a failure.

Torch-free: the router catches them (through Ray's wrapper, whose `cause` is the original).
"""

from __future__ import annotations


class RoleError(RuntimeError):
    """A call this worker's current role does not serve (or a role switch is under way); the
    router sends the request elsewhere, avoiding `worker_id`."""

    def __init__(self, message: str, worker_id: str = "") -> None:
        super().__init__(message)
        self.worker_id = worker_id

    def __reduce__(self):  # Ray pickles it to the caller: keep the worker id
        return (RoleError, (str(self), self.worker_id))


class MoveFailed(RuntimeError):
    """A request its decode worker moved off found no other decode worker with room; the router
    continues it by recomputing elsewhere, avoiding `worker_id` (the worker it left)."""

    def __init__(self, message: str, worker_id: str) -> None:
        super().__init__(message)
        self.worker_id = worker_id
