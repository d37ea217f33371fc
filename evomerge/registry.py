"""One registry for names: merge methods, optimizers, evaluator backends.

Like lm-evaluation-harness's Registry: duplicates are refused, entries may be lazy "module:attr"
strings (so vllm is imported only when asked for), and an unknown name gets a did-you-mean error.
"""

from __future__ import annotations

import importlib
from typing import Generic, Iterator, TypeVar

from evomerge.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str) -> T | str:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def __call__(self, name: str):
        """Decorator form: @REGISTRY("name")."""

        def wrap(obj: T) -> T:
            self.register(name, obj)
            return obj

        return wrap

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(self.unknown_message(name))
        entry = self._entries[name]
        if isinstance(entry, str):  # lazy "module:attr"
            module_name, attr = entry.split(":")
            entry = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def unknown_message(self, name: str) -> str:
        return f"unknown {self.kind} {name!r};{did_you_mean(name, self._entries)} available: {', '.join(sorted(self._entries))}"

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
