"""Registries of components keyed by exact name (projectors, vision backbones, LLM backbones): one class, so that
every kind registers, refuses duplicates and reports an unknown name the same way."""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T", bound=type)


class Registry(dict, Generic[T]):
    """name -> class. ``kind`` names what is registered in messages, ``key`` the config key that chooses it."""

    def __init__(self, kind: str, key: str, base: Optional[type] = None) -> None:
        super().__init__()
        self.kind, self.key, self.base = kind, key, base

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register under ``name`` (exactly; sets ``cls.registry_name``)."""

        def add(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' registered twice ({self[name]} and {cls})")
            if self.base is not None and not issubclass(cls, self.base):
                raise TypeError(f"{cls} must subclass {self.base.__name__} to be registered as a {self.kind}")
            self[name] = cls
            cls.registry_name = name
            return cls

        return add

    def lookup(self, name: str) -> T:
        """The class registered as ``name``; an unknown name is a KeyError naming the key and the valid names."""
        if name not in self:
            raise KeyError(f"unknown {self.kind} '{name}' (key {self.key}); valid: {', '.join(sorted(self))}")
        return self[name]
