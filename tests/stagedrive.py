"""Drive :class:`streams.app.KeyedStage` in-process: stand-ins for the faust event it reads
(``message.partition``, ``key``, ``value``; weak-referenceable, as faust's current event is)."""

from __future__ import annotations


class Msg:
    __slots__ = ("partition", "__weakref__")

    def __init__(self, partition: int) -> None:
        self.partition = partition


class Event:
    __slots__ = ("message", "key", "value", "__weakref__")

    def __init__(self, partition: int, value: bytes) -> None:
        self.message, self.key, self.value = Msg(partition), None, value
