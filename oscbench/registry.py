"""Name -> (builder, config schema) registries, one per config group (timm-style).

A plugin registers itself where it is defined, with its group's decorator:

    @QUANTIZERS.register("lsq", LSQConfig)
    class LSQQuantizer(Quantizer): ...

and its package's `__init__` imports every module of the package (`import_plugins`), so a
new file is found without a list to edit. Schemas check their own keys, named relative to
their node (`check(..., "start", ...)`); the registry prefixes the node's path
(`policy.freeze.start=...`) in the message.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that oscbench cannot run; the message names the fix."""


class InvalidValue(ConfigError):
    """`key=value is invalid; allowed: ...`, with `key` relative to the node that checked it."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid; allowed: {allowed}")

    def under(self, path: str) -> InvalidValue:
        return InvalidValue(f"{path}.{self.key}" if path else self.key, self.value, self.allowed)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `key=value is invalid; allowed: ...` unless `ok`."""
    if not ok:
        raise InvalidValue(key, value, allowed)


def parse(schema: type[T], node: Any, path: str) -> T:
    """Check `node` against the dataclass `schema` and return an instance of it.

    Unknown keys, missing keys and wrong types raise ConfigError naming `path`; range
    checks live in the schema's `__post_init__` (keys relative to the node), and `path` is
    put in front of them here.
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    data = dict(data or {})
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none (it takes no options)"
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
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
    except InvalidValue as e:
        raise e.under(path) from None
    except OmegaConfBaseException as e:
        key = f"{path}.{e.key}" if getattr(e, "key", None) else path
        raise ConfigError(f"{key}: {e.msg}") from None


@dataclasses.dataclass
class Entry(Generic[T]):
    name: str
    build: Callable[..., T] | None  # None: the option builds nothing (quantizer: none)
    schema: type | None

    def declares(self, attribute: str, default: Any) -> Any:
        """A class attribute the plugin declares (its capabilities, its requirements)."""
        return getattr(self.build, attribute, default)


class Registry(Generic[T]):
    """Maps config names to builders; `parse(node)` validates the node first. Every
    builder of a group is called with the group's one signature (see its base module)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, schema: type | None = None) -> Callable:
        def deco(build: Callable[..., T]) -> Callable[..., T]:
            self.add(Entry(name, build, schema))
            return build

        return deco

    def add(self, entry: Entry[T]) -> None:
        if entry.name in self._entries:
            raise KeyError(f"{self.group} '{entry.name}' registered twice")
        self._entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

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


def import_plugins(package: str, path: list[str]) -> None:
    """Import every module of a package, so that each plugin registers itself (a package's
    `__init__` calls this with its `__name__` and `__path__`)."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
