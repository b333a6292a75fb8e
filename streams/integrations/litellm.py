"""LiteLLM integration: :class:`BreakwaterGuard`, a custom callback that obeys ``agent.breaker``.

One object serves both ways LiteLLM is run (install with ``pip install 'breakwater[litellm]'``):

* **LiteLLM proxy** — its ``async_pre_call_hook`` runs before every request. Put two lines in a
  file next to the proxy's ``config.yaml`` (the proxy loads callbacks from files beside its config)::

      # breakwater_callbacks.py
      from streams.integrations.litellm import BreakwaterGuard
      guard = BreakwaterGuard()          # BREAKWATER_* env vars: broker, security, topic

  and reference it in ``config.yaml``::

      litellm_settings:
        callbacks: breakwater_callbacks.guard

* **LiteLLM SDK** — ``litellm.callbacks = [BreakwaterGuard()]``; ``litellm.acompletion`` calls
  every callback's ``async_pre_call_deployment_hook`` before it sends a request, and the guard
  checks there (a request the proxy hook already checked is not checked twice). The synchronous
  ``litellm.completion`` runs no pre-call hook: call :meth:`BreakwaterGuard.enforce` before it.

What a request is matched on (see :func:`scopes_of`): ``session`` from ``metadata.session_id``
(also ``litellm_metadata``, the proxy's ``litellm_session_id`` / ``x-litellm-session-id``, or the
``gen_ai.conversation.id`` / ``session.id`` keys); ``tenant`` from ``metadata.tenant`` /
``tenant_id`` / ``tenant.id``, else the same keys in the proxy key's metadata; ``workflow`` from
``metadata.workflow_id``; ``route`` is ``"{provider}/{model}"`` as Breakwater's detectors write it
(``gen_ai.provider.name`` / ``gen_ai.request.model``: ``gpt-4o`` → ``openai/gpt-4o``,
``bedrock/…`` → ``aws.bedrock/…``) unless ``metadata.route`` gives it; ``tool`` from
``metadata.tool``. Pass ``extract=`` to map requests your own way.

A denied request raises :class:`BreakwaterDenied` (a ``litellm.PermissionDeniedError``, HTTP 403
through the proxy); an empty throttle bucket raises :class:`BreakwaterThrottled` (a
``litellm.RateLimitError``, HTTP 429 with ``retry-after``). Both messages name the action, the
scope, the reason and the command id. Shadow-mode commands never deny; they are logged.

The guard owns a :class:`~streams.gateway.BreakerClient` running in a thread of its own (so it
works from any event loop, and from several); the first request waits up to ``ready_timeout_s``
for it to catch up with the topic, then, if it is still not ready, ``fail_open=True`` (the
default) lets requests through and ``fail_open=False`` answers 503.

>>> from streams.gateway import BreakerClient, command_json
>>> client = BreakerClient("127.0.0.1:9092", clock=lambda: 0.0)
>>> _ = client.apply(None, command_json("halt", "session", "s1", reason="no_progress_loop:repeat"))
>>> guard = BreakwaterGuard(client)
>>> guard.enforce({"model": "gpt-4o", "metadata": {"session_id": "s2"}}).allow
True
>>> guard.enforce({"model": "gpt-4o", "metadata": {"session_id": "s1"}})
Traceback (most recent call last):
...
streams.integrations.litellm.BreakwaterDenied: litellm.PermissionDeniedError: Breakwater halt on session:s1 (no_progress_loop:repeat), command cmd-halt-session-s1
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from litellm.exceptions import PermissionDeniedError, RateLimitError, ServiceUnavailableError
from litellm.integrations.custom_logger import CustomLogger

from streams.gateway import BreakerClient, Decision

if TYPE_CHECKING:  # pragma: no cover
    from streams.settings import Settings

__all__ = ["BreakwaterDenied", "BreakwaterGuard", "BreakwaterThrottled", "BreakwaterUnavailable", "route_for",
           "scopes_of"]

log = logging.getLogger("breakwater.litellm")

#: LiteLLM provider name → OpenTelemetry ``gen_ai.provider.name`` (what the spans, and so the
#: detectors' routes, carry). Names not listed are used as LiteLLM spells them.
PROVIDER_NAMES = {
    "azure": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "bedrock_converse": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}

_SESSION_KEYS = ("session_id", "gen_ai.conversation.id", "session.id")
_TENANT_KEYS = ("tenant", "tenant_id", "tenant.id")
_WORKFLOW_KEYS = ("workflow_id", "workflow.id")
_CHECKED = "breakwater_checked"
_RESPONSE = httpx.Response(403, request=httpx.Request("POST", "http://breakwater.invalid/breaker"))


class BreakwaterDenied(PermissionDeniedError):
    """A request refused by an enforced ``halt`` / ``trip`` / ``hold`` (HTTP 403); ``.decision`` says why.

    >>> e = BreakwaterDenied(Decision(False, "trip", "cost", "cmd-7", scope="tenant:acme"), model="gpt-4o")
    >>> e.status_code, e.decision.command_id
    (403, 'cmd-7')
    """

    def __init__(self, decision: Decision, *, model: str | None = None, provider: str | None = None) -> None:
        super().__init__(decision.message(), llm_provider=provider or "breakwater", model=model or "",
                         response=_RESPONSE)
        self.decision = decision


class BreakwaterThrottled(RateLimitError):
    """A request over a ``throttle``'s rate (HTTP 429, ``retry-after`` header); ``.decision`` says why.

    >>> e = BreakwaterThrottled(Decision(False, "throttle", "retry_storm:route", "cmd-3",
    ...                                  rate_limit_per_s=2.0, scope="route:openai/gpt-4o", retry_after_s=0.4))
    >>> e.status_code, e.headers["retry-after"]
    (429, '1')
    """

    def __init__(self, decision: Decision, *, model: str | None = None, provider: str | None = None) -> None:
        retry = decision.retry_after_s
        headers = {"retry-after": str(max(1, math.ceil(retry)))} if retry is not None else None
        kw: dict[str, Any] = {}
        try:
            from litellm.exceptions import RateLimitErrorCategory, RateLimitType

            kw = {"category": RateLimitErrorCategory.LITELLM_RATE_LIMIT, "rate_limit_type": RateLimitType.REQUESTS}
        except ImportError:  # pragma: no cover - older LiteLLM
            pass
        super().__init__(decision.message(), llm_provider=provider or "breakwater", model=model or "",
                         headers=headers, **kw)
        self.decision = decision


class BreakwaterUnavailable(ServiceUnavailableError):
    """The breaker state is not known yet and the guard fails closed (HTTP 503).

    >>> BreakwaterUnavailable("not ready").status_code
    503
    """

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(f"Breakwater: {message}", llm_provider="breakwater", model=model or "")


def _first(d: Any, keys: tuple[str, ...]) -> str | None:
    if isinstance(d, Mapping):
        for k in keys:
            v = d.get(k)
            if v is not None and v != "":
                return str(v)
    return None


def route_for(model: Any) -> str | None:
    """``"{provider}/{model}"`` for a LiteLLM model string, in OpenTelemetry's provider names.

    >>> route_for("gpt-4o"), route_for("anthropic/claude-3-5-sonnet"), route_for("bedrock/amazon.nova-pro-v1:0")
    ('openai/gpt-4o', 'anthropic/claude-3-5-sonnet', 'aws.bedrock/amazon.nova-pro-v1:0')
    >>> route_for("my-alias-nobody-knows"), route_for(None)
    ('-/my-alias-nobody-knows', None)
    """
    if not isinstance(model, str) or not model:
        return None
    return _route_for(model)


@functools.lru_cache(maxsize=4096)
def _route_for(model: str) -> str:
    # LiteLLM's own table, without get_llm_provider (which prints to stdout for unknown names)
    import litellm

    prefix, sep, rest = model.partition("/")
    if sep and prefix in _providers():
        provider, name = prefix, rest
    else:
        info = litellm.model_cost.get(model)
        provider = info.get("litellm_provider") if isinstance(info, dict) else None
        if not isinstance(provider, str):
            return f"-/{model}"
        provider = provider.split("-", 1)[0]  # "vertex_ai-language-models" → "vertex_ai"
        name = model
    return f"{PROVIDER_NAMES.get(provider, provider)}/{name}"


@functools.lru_cache(maxsize=1)
def _providers() -> frozenset[str]:
    import litellm

    return frozenset(str(getattr(p, "value", p)) for p in litellm.provider_list)


def scopes_of(data: Mapping[str, Any], user_api_key_dict: Any = None) -> dict[str, str | None]:
    """The breaker scopes of one LiteLLM request (proxy ``data`` or SDK ``kwargs``).

    >>> scopes_of({"model": "gpt-4o", "metadata": {"session_id": "s1", "tenant": "acme"}})
    {'tenant': 'acme', 'session': 's1', 'workflow': None, 'route': 'openai/gpt-4o', 'tool': None}
    >>> scopes_of({"model": "x", "litellm_session_id": "s9", "metadata": {"route": "openai/gpt-4o"}})["session"]
    's9'
    """
    metas = [data.get("metadata"), data.get("litellm_metadata")]
    key_meta = getattr(user_api_key_dict, "metadata", None) if user_api_key_dict is not None else None
    session = None
    for m in metas:
        session = session or _first(m, _SESSION_KEYS)
    session = session or _first(data, ("litellm_session_id",))
    tenant = None
    for m in (*metas, key_meta):
        tenant = tenant or _first(m, _TENANT_KEYS)
    workflow = None
    route = None
    tool = None
    for m in metas:
        workflow = workflow or _first(m, _WORKFLOW_KEYS)
        route = route or _first(m, ("route",))
        tool = tool or _first(m, ("tool", "gen_ai.tool.name"))
    if route is None:
        route = route_for(data.get("model"))
    return {"tenant": tenant, "session": session, "workflow": workflow, "route": route, "tool": tool}


def _mark(data: Any) -> None:
    if not isinstance(data, dict):
        return
    for k in ("metadata", "litellm_metadata"):
        m = data.get(k)
        if isinstance(m, dict):
            m[_CHECKED] = True
            return
    if data.get("metadata") is None:
        data["metadata"] = {_CHECKED: True}


def _marked(kwargs: Mapping[str, Any]) -> bool:
    for k in ("metadata", "litellm_metadata"):
        m = kwargs.get(k)
        if isinstance(m, Mapping) and m.get(_CHECKED):
            return True
    lp = kwargs.get("litellm_params")
    if isinstance(lp, Mapping):
        m = lp.get("metadata")
        if isinstance(m, Mapping) and m.get(_CHECKED):
            return True
    return False


class BreakwaterGuard(CustomLogger):
    """A LiteLLM callback that denies halted / tripped / held scopes and throttles throttled ones.

    ``client``: a :class:`~streams.gateway.BreakerClient` you run yourself; by default the guard
    creates one from ``settings`` (or the ``BREAKWATER_*`` environment) and starts it in a thread
    of its own at the first request. ``extract(data, user_api_key_dict) -> dict`` replaces
    :func:`scopes_of`.

    >>> from streams.gateway import BreakerClient, command_json
    >>> client = BreakerClient("127.0.0.1:9092", clock=lambda: 0.0)
    >>> _ = client.apply(None, command_json("throttle", "route", "openai/gpt-4o", rate_limit_per_s=1))
    >>> guard = BreakwaterGuard(client)
    >>> guard.enforce({"model": "gpt-4o"}).action
    'throttle'
    >>> guard.enforce({"model": "gpt-4o"})
    Traceback (most recent call last):
    ...
    streams.integrations.litellm.BreakwaterThrottled: litellm.RateLimitError: Breakwater throttle on route:openai/gpt-4o (test), command cmd-throttle-route-openai/gpt-4o, limit 1/s, retry after 1 s
    """

    def __init__(self, client: BreakerClient | None = None, *, settings: Settings | None = None,
                 ready_timeout_s: float = 10.0, fail_open: bool = True,
                 extract: Callable[[Mapping[str, Any], Any], Mapping[str, str | None]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if client is None:
            from streams.settings import Settings as _Settings

            client = BreakerClient(settings or _Settings(), client_id="breakwater-litellm")
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client
        self.ready_timeout_s = ready_timeout_s
        self.fail_open = fail_open
        self.extract = extract or scopes_of
        self._start_lock = threading.Lock()
        self._started = not self._owns_client
        self._warned_not_ready = False

    # ------------------------------------------------------------------------------ the decision

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self.client.start_in_thread(timeout_s=0)
                self._started = True

    def _decide(self, data: Mapping[str, Any], user_api_key_dict: Any = None) -> Decision:
        scopes = self.extract(data, user_api_key_dict)
        model = data.get("model")
        if self._owns_client and not self.client.ready:
            if self.fail_open:
                if not self._warned_not_ready:
                    self._warned_not_ready = True
                    log.warning("breakwater: breaker state not loaded yet (%s); letting requests through",
                                self.client.last_error or "catching up")
            else:
                raise BreakwaterUnavailable("breaker state not loaded yet", model=model)
        d = self.client.check(**scopes)
        if d.allow:
            if d.shadow and d.would_deny:
                log.info("breakwater (shadow, not enforced): %s", d.message())
            return d
        provider = None
        route = scopes.get("route")
        if route and "/" in route:
            provider = route.split("/", 1)[0]
        if d.action == "throttle":
            raise BreakwaterThrottled(d, model=model, provider=provider)
        raise BreakwaterDenied(d, model=model, provider=provider)

    def enforce(self, data: Mapping[str, Any], user_api_key_dict: Any = None) -> Decision:
        """Check one request (``{"model": …, "metadata": {…}}``) synchronously: the decision, or
        :class:`BreakwaterDenied` / :class:`BreakwaterThrottled`. Waits for readiness (blocking)
        only at the very first call of a guard that owns its client.

        >>> from streams.gateway import BreakerClient
        >>> BreakwaterGuard(BreakerClient("127.0.0.1:1")).enforce({"model": "gpt-4o"}).allow
        True
        """
        if not self._started:
            self._ensure_started()
            self.client.wait_ready(self.ready_timeout_s)
        return self._decide(data, user_api_key_dict)

    async def _enforce_async(self, data: Mapping[str, Any], user_api_key_dict: Any = None) -> Decision:
        if not self._started:
            self._ensure_started()
            await self.client.wait_ready_async(self.ready_timeout_s)
        return self._decide(data, user_api_key_dict)

    # ------------------------------------------------------------------------------ LiteLLM hooks

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> None:
        """The LiteLLM proxy's pre-call hook: raises to refuse, returns None to let the request on.

        >>> import asyncio
        >>> from streams.gateway import BreakerClient
        >>> guard = BreakwaterGuard(BreakerClient("127.0.0.1:1"))
        >>> data = {"model": "gpt-4o", "metadata": {"session_id": "s1"}}
        >>> asyncio.run(guard.async_pre_call_hook(None, None, data, "acompletion")) is None
        True
        >>> data["metadata"]["breakwater_checked"]   # the SDK-side hook will not check it again
        True
        """
        await self._enforce_async(data, user_api_key_dict)
        _mark(data)
        return None

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
        """Runs inside ``litellm.acompletion`` (SDK users; behind the proxy it skips what the proxy
        hook has checked already).

        >>> import asyncio
        >>> from streams.gateway import BreakerClient, command_json
        >>> client = BreakerClient("127.0.0.1:1")
        >>> _ = client.apply(None, command_json("halt", "session", "s1"))
        >>> guard = BreakwaterGuard(client)
        >>> asyncio.run(guard.async_pre_call_deployment_hook({"model": "gpt-4o", "metadata": {"session_id": "s1"}},
        ...                                                  "acompletion"))
        Traceback (most recent call last):
        ...
        streams.integrations.litellm.BreakwaterDenied: litellm.PermissionDeniedError: Breakwater halt on session:s1 (test), command cmd-halt-session-s1
        """
        if _marked(kwargs):
            return None
        await self._enforce_async(kwargs)
        return None

    def close(self) -> None:
        """Stop the client the guard started (a client passed in is the caller's to stop).

        >>> from streams.gateway import BreakerClient
        >>> BreakwaterGuard(BreakerClient("127.0.0.1:1")).close()
        """
        if self._owns_client:
            self.client.close()
