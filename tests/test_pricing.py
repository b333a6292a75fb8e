"""Price table: model-name matching, token pricing, and what stays unpriced."""

from __future__ import annotations

import pytest

from streams.policy import Price
from streams.pricing import ModelPrice, PriceTable, span_cost
from tests.spans import span

TABLE = PriceTable({
    "gpt-4o": {"input": 2.5, "output": 10.0, "cached": 1.25},
    "gpt-4o-mini": {"input": 0.15, "output": 0.6},
    "gpt-4.1": {"input": 2.0, "output": 8.0},
    "claude-3-5-sonnet": {"input": 3.0, "output": 15.0},
    "claude-3-5-haiku": {"input": 0.8, "output": 4.0},
    "azure/gpt-4o": {"input": 2.75, "output": 11.0},
    "gemini-2.0-flash": {"input": 0.1, "output": 0.4},
    "Llama-3.1-70B": {"input": 0.9, "output": 0.9},
})

LOOKUPS = [
    ("exact", "gpt-4o", None, 2.5),
    ("case-insensitive", "GPT-4o", None, 2.5),
    ("dated snapshot", "gpt-4o-2024-08-06", None, 2.5),
    ("sibling listed", "gpt-4o-mini-2024-07-18", None, 0.15),
    ("dotted version", "gpt-4.1-2025-04-14", None, 2.0),
    ("compact date", "claude-3-5-sonnet-20241022", None, 3.0),
    ("vertex @date", "claude-3-5-haiku@20241022", None, 0.8),
    ("bedrock id", "us.anthropic.claude-3-5-sonnet-20241022-v2:0", None, 3.0),
    ("path prefix", "models/gemini-2.0-flash", None, 0.1),
    ("-latest", "claude-3-5-sonnet-latest", None, 3.0),
    ("-0613 snapshot", "gpt-4o-0613", None, 2.5),
    ("longest prefix at a boundary", "gemini-2.0-flash-lite-preview", None, 0.1),
    ("provider-qualified key wins", "gpt-4o-2024-08-06", "azure", 2.75),
    ("provider without its own key", "gpt-4o", "openai", 2.5),
    ("table keys are case-folded", "llama-3.1-70b", None, 0.9),
    ("no boundary, no match", "gpt-4oo", None, None),
    ("unknown", "mistral-large", None, None),
    ("empty", "", None, None),
]


@pytest.mark.parametrize(("name", "model", "provider", "want"), LOOKUPS, ids=[c[0] for c in LOOKUPS])
def test_lookup(name, model, provider, want):
    p = TABLE.lookup(model, provider)
    assert (p.input if p else None) == want


def test_empty_table_prices_nothing():
    assert PriceTable().lookup("gpt-4o") is None
    assert len(PriceTable()) == 0


def test_cost_with_cached_tokens_both_conventions():
    # OTel: cached tokens are part of input tokens
    assert TABLE.cost("gpt-4o", 1000, 100, cached_tokens=400) == pytest.approx((600 * 2.5 + 400 * 1.25 + 1000) / 1e6)
    # more cached than input: reported on top (the other convention)
    assert TABLE.cost("gpt-4o", 100, 0, cached_tokens=1000) == pytest.approx((100 * 2.5 + 1000 * 1.25) / 1e6)
    # no cached price: billed as input
    assert TABLE.cost("gpt-4o-mini", 1000, 0, cached_tokens=500) == pytest.approx(1000 * 0.15 / 1e6)


def test_accepts_policy_prices_and_validates():
    t = PriceTable({"m": Price(input=1.0, output=2.0)})
    assert t.lookup("m") == ModelPrice(1.0, 2.0, None)
    with pytest.raises(ValueError, match="finite"):
        PriceTable({"m": {"input": float("nan"), "output": 1}})
    with pytest.raises(ValueError, match="empty model name"):
        PriceTable({" ": {"input": 1, "output": 1}})


def chat(**attrs):
    return span(1, op="chat", **attrs)


SPAN_COSTS = [
    ("reported cost wins", chat(gen_ai__usage__cost=0.5, gen_ai__request__model="gpt-4o",
                                gen_ai__usage__input_tokens=10**6), 0.5),
    ("usage.cost.total", chat(usage__cost__total="0.25"), 0.25),
    ("negative reported cost is no report", chat(gen_ai__usage__cost=-1, gen_ai__request__model="gpt-4o",
                                                 gen_ai__usage__input_tokens=1000), 0.0025),
    ("tokens x price", chat(gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=1000,
                            gen_ai__usage__output_tokens=500), 0.0075),
    ("response model first", chat(gen_ai__request__model="gpt-4o", gen_ai__response__model="gpt-4o-mini-2024-07-18",
                                  gen_ai__usage__input_tokens=1000), 0.00015),
    ("provider from the span", chat(gen_ai__provider__name="azure", gen_ai__request__model="gpt-4o",
                                    gen_ai__usage__input_tokens=1000), 0.00275),
    ("cached tokens attribute", chat(gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=1000,
                                     gen_ai__usage__cache_read__input_tokens=1000), 0.00125),
    ("unknown model: unpriced", chat(gen_ai__request__model="mystery", gen_ai__usage__input_tokens=1000), None),
    ("tokens without a model: unpriced", chat(gen_ai__usage__input_tokens=1000), None),
    ("model call without tokens: unpriced", chat(gen_ai__request__model="gpt-4o"), None),
    ("tool span: free", span(1, tool="search"), 0.0),
    ("agent span without usage: free", span(1, op="invoke_agent", gen_ai__request__model="gpt-4o"), 0.0),
    ("plain span: free", span(1), 0.0),
]


@pytest.mark.parametrize(("name", "s", "want"), SPAN_COSTS, ids=[c[0] for c in SPAN_COSTS])
def test_span_cost(name, s, want):
    got = span_cost(s, TABLE)
    assert got == (pytest.approx(want) if want is not None else None)


def test_without_a_table_tokens_are_unpriced():
    s = chat(gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=1000)
    assert span_cost(s, None) is None
    assert span_cost(chat(gen_ai__usage__cost=0.1), None) == 0.1
