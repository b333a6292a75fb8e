"""Pricing spans that do not report their cost (SPEC §3 "cost", §4.3).

A span's cost is, first present wins: ``gen_ai.usage.cost`` / ``usage.cost.total`` as reported;
else its tokens × the price table **of the policy file** (there is deliberately no built-in table:
prices change, and a wrong default would be guessing). A span that should cost money but cannot be
priced (a model call without tokens, or a model missing from the table) is *unpriced*:
:func:`span_cost` returns ``None`` and the detectors count it, never guess.

Prices are USD per million tokens: ``input``, ``output`` and ``cached`` (cached input; when absent,
cached tokens are billed at the input price). Following the OTel GenAI conventions, cached tokens
are part of ``gen_ai.usage.input_tokens``; a span reporting more cached than input tokens uses the
other convention (cached tokens counted separately) and is billed that way.

Model names are matched as follows (the first hit wins; every table key is lower-cased):

1. ``provider/model`` exactly (``gen_ai.provider.name``), then ``model`` exactly;
2. the name without a path prefix (``models/gemini-2.0-flash`` → ``gemini-2.0-flash``) and without
   dotted vendor/region prefixes (``us.anthropic.claude-…`` → ``claude-…``);
3. the name with version suffixes stripped one at a time, trying each: ``:0``, ``-v2``,
   ``-latest``, dates (``-2024-08-06``, ``-20240806``, ``@20240620``) and ``-0613``-style
   snapshots — so ``gpt-4o-2024-08-06`` finds ``gpt-4o``;
4. the **longest** table key that is a prefix of the name at a ``-``/``.``/``:``/``@`` boundary
   (``claude-3-5-sonnet`` prices ``claude-3-5-sonnet-v2-preview``). A prefix also matches a cheaper
   sibling (``gpt-4o`` would price ``gpt-4o-mini`` if the table lacks the latter): list every model
   you use.

>>> t = PriceTable({"gpt-4o": {"input": 2.5, "output": 10.0, "cached": 1.25}})
>>> t.lookup("gpt-4o-2024-08-06").input, t.lookup("openai/gpt-4o").output
(2.5, 10.0)
>>> t.cost("gpt-4o", 1000, 100, cached_tokens=400)
0.003
>>> t.lookup("llama-3-70b") is None
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from streams import semconv
from streams.models import Span

_CACHE_MAX = 4096
_VENDOR_PREFIX = re.compile(r"^(?:[a-z]+\.)+(?=[a-z])")
_SUFFIXES = (
    re.compile(r":\d+$"),
    re.compile(r"-v\d+(?:\.\d+)?$"),
    re.compile(r"-latest$"),
    re.compile(r"[-@]\d{4}-\d{2}-\d{2}$"),
    re.compile(r"[-@]\d{8}$"),
    re.compile(r"-\d{4}$"),
)
_BOUNDARY = frozenset("-.:@_")
_INF = float("inf")
_COST_KEYS = ("gen_ai.usage.cost", "usage.cost.total")
_TOKEN_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens for one model; validated once.

    >>> ModelPrice(3.0, 15.0).cached_or_input
    3.0
    >>> ModelPrice(-1.0, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: prices must be finite and >= 0, got input=-1.0
    """

    input: float
    output: float
    cached: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached"):
            v = getattr(self, name)
            if v is None and name == "cached":
                continue
            if not isinstance(v, int | float) or isinstance(v, bool) or not (0 <= v < float("inf")):
                raise ValueError(f"prices must be finite and >= 0, got {name}={v}")

    @property
    def cached_or_input(self) -> float:
        return self.input if self.cached is None else self.cached


def _price(v: Any) -> ModelPrice:
    if isinstance(v, ModelPrice):
        return v
    if isinstance(v, Mapping):
        return ModelPrice(float(v["input"]), float(v["output"]),
                          None if v.get("cached") is None else float(v["cached"]))
    # pydantic ``Price`` of the policy, or anything with the three attributes
    cached = getattr(v, "cached", None)
    return ModelPrice(float(v.input), float(v.output), None if cached is None else float(cached))


def _strip_path(name: str) -> str:
    name = name.rsplit("/", 1)[-1]
    return _VENDOR_PREFIX.sub("", name)


def candidates(model: str) -> list[str]:
    """The names tried for exact matches, most specific first (rules 1–3 of the module doc).

    >>> candidates("us.anthropic.claude-3-5-sonnet-20241022-v2:0")
    ['us.anthropic.claude-3-5-sonnet-20241022-v2:0', 'claude-3-5-sonnet-20241022-v2:0', 'claude-3-5-sonnet-20241022-v2', 'claude-3-5-sonnet-20241022', 'claude-3-5-sonnet']
    """
    name = model.strip().lower()
    out = [name]
    base = _strip_path(name)
    if base and base != name:
        out.append(base)
    cur = base
    changed = True
    while changed:
        changed = False
        for rx in _SUFFIXES:
            nxt = rx.sub("", cur)
            if nxt != cur and nxt:
                cur = nxt
                out.append(cur)
                changed = True
                break
    return out


class PriceTable:
    """Prices by model name, with the matching rules of the module doc; lookups are cached.

    ``prices`` maps a model name (optionally ``provider/model``) to a :class:`ModelPrice`, a
    mapping with ``input``/``output``/``cached``, or the policy's pydantic ``Price``.

    >>> t = PriceTable({"claude-3-5-sonnet": {"input": 3, "output": 15},
    ...                 "anthropic/claude-3-5-haiku": {"input": 0.8, "output": 4}})
    >>> t.lookup("us.anthropic.claude-3-5-sonnet-20241022-v2:0").output
    15.0
    >>> t.lookup("claude-3-5-haiku-20241022", provider="anthropic").input, t.lookup("claude-3-5-haiku-20241022")
    (0.8, None)
    >>> len(PriceTable({}))
    0
    """

    def __init__(self, prices: Mapping[str, Any] | None = None) -> None:
        self._exact: dict[str, ModelPrice] = {}
        for k, v in (prices or {}).items():
            key = str(k).strip().lower()
            if not key:
                raise ValueError("price table: empty model name")
            self._exact[key] = _price(v)
        # prefix candidates: keys without a provider part, longest first
        self._prefixes = sorted((k for k in self._exact if "/" not in k), key=len, reverse=True)
        self._cache: dict[tuple[str | None, str], ModelPrice | None] = {}

    def __len__(self) -> int:
        return len(self._exact)

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model`` (served by ``provider``), or None when the table has none."""
        ck = (provider, model)
        try:
            return self._cache[ck]
        except KeyError:
            pass
        found = self._find(model, provider)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[ck] = found
        return found

    def _find(self, model: str, provider: str | None) -> ModelPrice | None:
        if not self._exact or not model:
            return None
        names = candidates(model)
        if provider:
            p = provider.strip().lower()
            for n in names:
                hit = self._exact.get(f"{p}/{n}")
                if hit is not None:
                    return hit
        for n in names:
            hit = self._exact.get(n)
            if hit is not None:
                return hit
        base = _strip_path(model.strip().lower())
        for k in self._prefixes:
            if len(base) > len(k) and base.startswith(k) and base[len(k)] in _BOUNDARY:
                return self._exact[k]
        return None

    def cost(self, model: str, input_tokens: int, output_tokens: int, *, cached_tokens: int = 0,
             provider: str | None = None) -> float | None:
        """USD for one call, or None when the model has no price."""
        p = self.lookup(model, provider)
        if p is None:
            return None
        if cached_tokens > input_tokens:  # cached reported on top of input (not included in it)
            uncached = input_tokens
        else:
            uncached = input_tokens - cached_tokens
        usd = (uncached * p.input + cached_tokens * p.cached_or_input + output_tokens * p.output) / 1e6
        return round(usd, 9)


EMPTY = PriceTable()


def span_cost(span: Span, table: PriceTable | None = None, *, model_call: bool | None = None) -> float | None:
    """USD of one span, or None when it cannot be priced.

    Reported cost first; else tokens × ``table``; a model call without tokens, or with a model the
    table cannot price, is ``None`` (unpriced). A span that is no model call and reports neither
    cost nor tokens costs ``0.0``.

    >>> from streams.models import Span
    >>> mk = lambda a: Span("t", "s", None, "chat", "CLIENT", 0, 1, "OK", "", a, {})
    >>> t = PriceTable({"gpt-4o-mini": {"input": 0.15, "output": 0.6}})
    >>> span_cost(mk({"gen_ai.usage.cost": 0.02}), t)
    0.02
    >>> span_cost(mk({"gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 1000,
    ...               "gen_ai.usage.output_tokens": 100}), t)
    0.00021
    >>> span_cost(mk({"gen_ai.request.model": "mystery", "gen_ai.usage.input_tokens": 5}), t) is None
    True
    >>> span_cost(mk({"gen_ai.tool.name": "ls"}), t)
    0.0
    """
    a = span.attributes
    if _COST_KEYS[0] in a or _COST_KEYS[1] in a:
        reported = semconv.reported_cost_of(span)
        if reported is not None and 0 <= reported < _INF:  # a negative or NaN cost is no report
            return reported
    i = o = 0
    if _TOKEN_KEYS[0] in a or _TOKEN_KEYS[1] in a:
        i, o = semconv.tokens_of(span)
    if i > 0 or o > 0:
        model = semconv.model_of(span)
        if model is None or table is None:
            return None
        return table.cost(model, i, o, cached_tokens=semconv.cached_tokens_of(span),
                          provider=semconv.provider_of(span))
    if semconv.is_model_call(span) if model_call is None else model_call:
        return None
    return 0.0
