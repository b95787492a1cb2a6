"""Composing configurations with Hydra outside `python -m oscbench.run`'s own composition:
the fp run a quantized run starts from, the method presets' declarations, tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """The configuration Hydra composes from conf/ for these overrides, inside a running
    Hydra app (a job of a sweep, a toy) or outside one: the app's own Hydra state is set
    aside meanwhile and restored. `hydra_node`: keep the `hydra` node (for the run
    directory's name)."""
    state = Singleton.get_state()
    GlobalHydra.instance().clear()
    try:
        with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra.compose("config", overrides, return_hydra_config=hydra_node)
    finally:
        Singleton.set_state(state)
    return resolve_recipe(cfg, overrides, hydra_node)


def paper_recipe(cfg: DictConfig) -> str:
    """The recipe `recipe=paper` stands for: the one the method's preset names
    (`method.paper`), or `common` for a method of no seed paper."""
    return cfg.method.get("paper") or "common"


def resolve_recipe(cfg: DictConfig, overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """`recipe=paper` composed again as `recipe=<the method's paper recipe>`: Hydra cannot
    choose a config group (a paper's activation quantizer) from a value, so the choice is
    made here, and the record holds the recipe that ran."""
    if cfg.recipe.name != "paper":
        return cfg
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "recipe"]
    return compose([*kept, f"recipe={paper_recipe(cfg)}"], hydra_node)


@dataclass(frozen=True)
class Preset:
    """A `method=` preset as it declares itself in conf/method/<name>.yaml."""

    name: str
    quantizer: str
    policies: tuple[str, ...]
    ptq: bool
    order: int  # its place in tables and sweeps
    keys: frozenset[str]  # the config groups and keys the preset sets
    choices: tuple[str, ...]  # its config-group choices as overrides (`policy=[dampen]`)


def _leaves(node: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out |= _leaves(value, path + ".") if isinstance(value, dict) else {path}
    return out


@cache
def presets() -> tuple[Preset, ...]:
    """Every preset in conf/method/, in their `order`."""
    found = []
    for path in Path(CONF_DIR, "method").glob("*.yaml"):
        node = OmegaConf.to_container(OmegaConf.load(path))
        groups = {
            key.split("/")[-1]: value
            for entry in node.pop("defaults", [])
            for key, value in entry.items()
        }
        choices = tuple(
            f"{g}=[{','.join(v)}]" if isinstance(v, list) else f"{g}={v}" for g, v in groups.items()
        )
        m = node.pop("method")
        keys = frozenset({"method"} | set(groups) | _leaves(node))
        found.append(
            Preset(
                m["name"], m["quantizer"], tuple(m["policies"]), m["ptq"], m["order"], keys, choices
            )
        )
    return tuple(sorted(found, key=lambda p: (p.order, p.name)))


def method_free(overrides: list[str]) -> list[str]:
    """The overrides that do not concern the method: those of no key or group that a
    preset sets (what the fp counterpart of a run keeps)."""
    method_keys = {"method"}.union(*(p.keys for p in presets()))
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        o.input_line
        for o in parsed
        if not any(o.key_or_group == k or o.key_or_group.startswith(k + ".") for k in method_keys)
    ]
