"""Errors the engine raises for requests it cannot serve as given."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given; the message names the field and the fix.

    Raising it changes nothing in the engine. It crosses Ray unchanged in type, so the router
    answers the client with INVALID_ARGUMENT (HTTP 400) instead of taking it for a worker failure.
    """
