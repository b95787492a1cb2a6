"""Name -> (builder, config schema) registries, one per config group (timm-style)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that oscbench cannot run; the message names the fix."""


def parse(schema: type[T], node: Any, path: str) -> T:
    """Check `node` against the dataclass `schema` and return an instance of it.

    Unknown keys, missing keys and wrong types raise ConfigError naming `path`; range
    checks live in the schema's `__post_init__` and raise ConfigError themselves.
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    data = dict(data or {})
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    missing = sorted(
        f.name
        for f in dataclasses.fields(schema)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except OmegaConfBaseException as e:
        key = f"{path}.{e.key}" if getattr(e, "key", None) else path
        raise ConfigError(f"{key}: {e.msg}") from None


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError `key=value is invalid; allowed: ...` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass
class Entry(Generic[T]):
    name: str
    build: Callable[..., T]
    schema: type | None


class Registry(Generic[T]):
    """Maps config names to builders; `build(node)` validates the node first."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, schema: type | None = None) -> Callable:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.group} '{name}' registered twice")
            self._entries[name] = Entry(name, fn, schema)
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.group} '{name}'; available: {', '.join(self.names())} "
                f"(choose with {self.group}=NAME)"
            )
        return self._entries[name]

    def parse(self, node: Any, path: str | None = None) -> Any:
        """Validate a group node (`name` + options) against its entry's schema."""
        path = path or self.group
        name = node["name"]
        entry = self.get(name)
        options = {k: v for k, v in dict(node).items() if k != "name"}
        if entry.schema is None:
            if options:
                raise ConfigError(f"{path} '{name}' takes no options; got {sorted(options)}")
            return None
        return parse(entry.schema, options, path)
