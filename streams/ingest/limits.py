"""Resource limits applied to every ingested message (README "Topics", §3).

Limits protect the hot path and detector state from hostile or broken producers.  Exceeding a
limit never raises: :func:`streams.ingest.decode` turns it into a
:class:`~streams.models.Rejection` (or, for over-long strings, a silent truncation).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True, frozen=True)
class Limits:
    """Per-message decoding limits.

    ``max_message_bytes``
        Largest accepted message value, in bytes.  A larger value is rejected as a whole
        (``oversized``) before any parsing.
    ``max_spans_per_message``
        Most spans one message may carry (a JSON array, the JSON lines of one message, or all
        spans of one OTLP request together).  More rejects the whole message (``too_many_spans``).
    ``max_attributes``
        Most attributes per attribute set, counted after nested objects / ``kvlistValue`` are
        flattened to dotted keys.  Span attributes, resource attributes and the attributes of each
        event are counted separately.  More rejects the span (``too_many_attributes``).
    ``max_depth``
        Deepest container nesting inside one attribute value (nested JSON objects/arrays in flat
        JSON, ``kvlistValue``/``arrayValue`` in OTLP; a scalar has depth 0, ``{"a": 1}`` depth 1).
        The span envelope itself is not counted.  Deeper rejects the span (``too_deep``); a JSON
        document deeper than the parser's own limit (1024) is rejected as a whole (``too_deep``).
    ``max_string_bytes``
        Longest attribute string value (UTF-8 bytes) kept; longer strings are truncated at a
        character boundary, not rejected.  Also applied to span names, event names and status
        messages.

    Every field must be a positive ``int``:

    >>> Limits().max_spans_per_message
    10000
    >>> Limits(max_depth=0)
    Traceback (most recent call last):
    ...
    ValueError: Limits.max_depth must be a positive int, got 0
    """

    max_message_bytes: int = 1_048_576
    max_spans_per_message: int = 10_000
    max_attributes: int = 256
    max_depth: int = 16
    max_string_bytes: int = 65_536

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 1:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {v!r}")


DEFAULT_LIMITS = Limits()
"""The limits :func:`streams.ingest.decode` uses when none are given."""
