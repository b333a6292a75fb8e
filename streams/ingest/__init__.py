"""Ingest: one Kafka message value (or one replay-file line) to normalized, scrubbed spans.

Pure functions, no Kafka.  :func:`decode` auto-detects flat JSON (object, array, JSON lines),
OTLP JSON and OTLP protobuf, normalizes every span to :class:`~streams.models.Span` (README "What producers send"),
applies the privacy rule (tool arguments hashed into ``tool.payload_hash``, content attributes
dropped) and never raises: what cannot become a span becomes a
:class:`~streams.models.Rejection`.  :func:`iter_documents` splits replay files.

>>> import io
>>> line = (b'{"trace_id": "' + b"ab" * 16 + b'", "span_id": "' + b"cd" * 8 + b'", "name": "x",'
...         b' "start_time_unix_nano": 1, "end_time_unix_nano": 2,'
...         b' "attributes": {"gen_ai.prompt": "secret", "gen_ai.tool.name": "search"}}')
>>> [decode(doc).spans[0].attributes for doc in iter_documents(io.BytesIO(line + b"\\n"))]
[{'gen_ai.tool.name': 'search'}]
"""

from streams.ingest.decode import Decoded, decode, iter_documents
from streams.ingest.limits import DEFAULT_LIMITS, Limits

FORMATS = ("flat", "otlp_json", "otlp_proto", "empty", "unknown")
"""Every value :attr:`Decoded.format` can take."""

__all__ = ["DEFAULT_LIMITS", "FORMATS", "Decoded", "Limits", "decode", "iter_documents"]
