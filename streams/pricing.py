"""Pricing spans that do not report their cost (README "Cost and prices").

A span's cost is, first present wins: the cost the producer reported, in any dialect
(``gen_ai.usage.cost``, ``gen_ai.usage.cost.amount``, ``llm.cost.total``, … — see
:mod:`streams.ingest.dialects`); else its tokens × the price table of the policy file; else its
tokens × the default prices bundled with the ``genai-prices`` package (Pydantic's maintained price
data, read offline; the policy's ``default_prices = false`` turns them off). A span that should cost
money but cannot be priced (a model call without tokens, or a model no table knows) is
*unpriced*: :func:`span_cost` returns ``None`` and the detectors count it, never guess. Tiered
prices (a higher rate above some prompt length) are taken at their base tier: a lower bound.

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

    def __init__(self, prices: Mapping[str, Any] | None = None, *, defaults: bool = False) -> None:
        self.defaults = defaults
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

    def __bool__(self) -> bool:
        return bool(self._exact) or self.defaults

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model`` (served by ``provider``), or None when the table has none."""
        ck = (provider, model)
        try:
            return self._cache[ck]
        except KeyError:
            pass
        found = self._find(model, provider)
        if found is None and self.defaults:
            found = default_price(model, provider)
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

_PROVIDER_IDS = {  # gen_ai.provider.name / gen_ai.system values → genai-prices provider ids
    "openai": "openai", "azure.ai.openai": "azure", "azure": "azure", "anthropic": "anthropic",
    "gcp.gemini": "google", "gcp.vertex_ai": "google", "gemini": "google", "google": "google",
    "vertex_ai": "google", "aws.bedrock": "aws", "bedrock": "aws", "mistral_ai": "mistral",
    "mistralai": "mistral", "mistral": "mistral", "groq": "groq", "deepseek": "deepseek",
    "x_ai": "x-ai", "xai": "x-ai", "cohere": "cohere", "perplexity": "perplexity",
}
_DEFAULTS: dict[tuple[str | None, str], ModelPrice | None] = {}


def _mtok(v: Any) -> float | None:
    if v is None:
        return None
    base = getattr(v, "base", v)  # TieredPrices: the base tier (a lower bound)
    try:
        f = float(base)
    except (TypeError, ValueError):
        return None
    return f if 0 <= f < _INF else None


def default_price(model: str, provider: str | None = None) -> ModelPrice | None:
    """The bundled ``genai-prices`` price of ``model`` (USD per million tokens), or None.

    Looked up once per (provider, model) and cached; never touches the network.

    >>> default_price("gpt-4o-2024-08-06").input, default_price("gpt-4o", "openai").output
    (2.5, 10.0)
    >>> default_price("no-such-model-xyz") is None
    True
    """
    key = (provider, model)
    if key in _DEFAULTS:
        return _DEFAULTS[key]
    found = None
    try:
        from genai_prices import Usage, calc_price
    except ImportError:  # pragma: no cover - a dependency; absent only in stripped installs
        calc_price = None
    if calc_price is not None and model:
        pid = _PROVIDER_IDS.get((provider or "").strip().lower())
        names = [model.strip()]
        base = _strip_path(model.strip().lower())
        if base and base != names[0].lower():
            names.append(base)
        for name in names:
            try:
                calc = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=name, provider_id=pid)
            except Exception:  # LookupError and anything else: not priced by default
                if pid is None:
                    continue
                try:
                    calc = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=name)
                except Exception:
                    continue
            mp = calc.model_price
            i, o = _mtok(mp.input_mtok), _mtok(mp.output_mtok)
            if i is None or o is None:
                continue
            found = ModelPrice(i, o, _mtok(getattr(mp, "cache_read_mtok", None)))
            break
    if len(_DEFAULTS) >= _CACHE_MAX:
        _DEFAULTS.clear()
    _DEFAULTS[key] = found
    return found


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
    f = span.feat
    if f is None:
        f = semconv.features(span)
    if f.cost is not None:  # reported, in any dialect (finite and >= 0: ingest checked)
        return f.cost
    i, o = f.input_tokens, f.output_tokens
    if i > 0 or o > 0:
        model = f.response_model or f.request_model
        if model is None or table is None:
            return None
        c = table.cost(model, i, o, cached_tokens=f.cached_tokens, provider=f.provider)
        if c is None and f.request_model and f.request_model != model:
            c = table.cost(f.request_model, i, o, cached_tokens=f.cached_tokens, provider=f.provider)
        return c
    if semconv.is_model_call(span) if model_call is None else model_call:
        return None
    return 0.0
