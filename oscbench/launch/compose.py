"""Composing configurations with Hydra outside `python -m oscbench.run`'s own composition:
the fp run a quantized run starts from, the method presets' declarations, tests."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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


COMPONENTS = ("quantizer", "act_quantizer")  # groups whose options a plugin's schema names


def without_recipe(overrides: list[str]) -> list[str]:
    """The overrides less any that chooses the recipe (`recipe=...`, `+recipe=...`)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "recipe"]


def resolve_recipe(cfg: DictConfig, overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """The configuration as it runs under its recipe, so that the record says what ran:

    - `recipe=paper` is composed again as `recipe=<the method's paper recipe>` (Hydra cannot
      choose a config group, a paper's activation quantizer, from a value);
    - a recipe's setting of a quantizer that the run's quantizer does not have
      (nagel2022's `quantizer.init` on StatsQ) is left out, and named in
      `recipe.not_applied`: a paper's recipe applies to any method, as far as it fits;
    - a full-precision run without policies (fp, ptq) neither starts from nor distils the fp
      run, which a recipe asks for the quantized runs: `init_from=fp`, `teacher=fp` and its
      distillation are dropped."""
    if cfg.recipe.name == "paper":
        return compose([*without_recipe(overrides), f"recipe={paper_recipe(cfg)}"], hydra_node)
    not_applied = [f"{group}.{key}" for group, key in _unfit(cfg)]
    alone = cfg.quantizer.name == "none" and not cfg.get("policy")
    if not (not_applied or (alone and "fp" in (cfg.init_from, cfg.teacher))):
        return cfg
    cfg = copy.deepcopy(cfg)  # the caller's stays as it was composed
    with open_dict(cfg):
        for group, key in _unfit(cfg):
            del cfg[group][key]
        if not_applied:
            cfg.recipe.not_applied = not_applied
        if alone and cfg.init_from == "fp":
            cfg.init_from = None
        if alone and cfg.teacher == "fp":
            cfg.teacher, cfg.distill.loss = None, "none"
    return cfg


def _unfit(cfg: DictConfig) -> list[tuple[str, str]]:
    """The (group, key) pairs that the recipe sets and the group's chosen plugin has no
    option for (every key, for quantizer=none); where the recipe chooses the group's plugin
    (aoq2025: act_quantizer=ltq), also the options set for another plugin (an experiment's
    for LSQ inputs)."""
    from oscbench.quant.base import QUANTIZERS  # the registries: only where a recipe sets keys

    found = []
    sets, chooses = _recipe_keys(str(cfg.recipe.name))
    for group in COMPONENTS:
        keys = [k for k in cfg[group] if k != "name"] if group in chooses else sets.get(group)
        if not keys:
            continue
        name = cfg[group].name
        schema = QUANTIZERS.get(name).schema if name != "none" else None
        fields = {f.name for f in dataclasses.fields(schema)} if schema else set()
        found += [(group, k) for k in keys if k not in fields and k in cfg[group]]
    return found


@cache
def _recipe_keys(recipe: str) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    """The options conf/recipe/<recipe>.yaml sets in each component group, and the groups
    whose plugin it chooses (its defaults list)."""
    path = Path(CONF_DIR, "recipe", f"{recipe}.yaml")
    node = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    chosen = {k.split("/")[-1] for entry in node.get("defaults", []) for k in entry}
    sets = {g: tuple(node[g]) for g in COMPONENTS if isinstance(node.get(g), dict)}
    return sets, frozenset(chosen & set(COMPONENTS))


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


def method_free(overrides: list[str], also: tuple[str, ...] = ()) -> list[str]:
    """The overrides that do not concern the method: those of no key or group that a
    preset sets, nor of `also` (what the fp counterpart of a run keeps)."""
    method_keys = {"method", *also}.union(*(p.keys for p in presets()))
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        o.input_line
        for o in parsed
        if not any(o.key_or_group == k or o.key_or_group.startswith(k + ".") for k in method_keys)
    ]
