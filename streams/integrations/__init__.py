"""Ready-made integrations of Breakwater with the libraries its users already run.

* :mod:`streams.integrations.litellm` — a LiteLLM proxy callback (pre-call hook) and SDK
  callback that obeys the breaker topic (extra: ``pip install 'breakwater[litellm]'``).

Each integration imports its third-party library only when its own module is imported.

>>> import streams.integrations
>>> streams.integrations.__name__
'streams.integrations'
"""
