"""Names that come from what a run is: its bit-width label, its method label, and its run
directory (defined here once: conf/config.yaml's hydra.run.dir and hydra.sweep.subdir call
`run_dir_name` through the `oscbench_run_name` resolver)."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePath

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

PATH_KEYS = ("init_from", "teacher")  # settings whose value may be a path


def bits_label(bits: int, act_bits: int, quantizer: str, act_quantizer: str, ptq: bool) -> str:
    """The bit-widths a run actually used: w<bits>a<act_bits>, a32 for full-precision
    activations, fp32 for a run whose weights stay in full precision throughout."""
    if quantizer == "none":
        return f"w{bits}a32" if ptq else "fp32"
    return f"w{bits}a{act_bits if act_quantizer != 'none' else 32}"


def method_label(method: DictConfig, quantizer: str, policies: list[str], ptq: bool) -> str:
    """The preset's name when the run has the components the preset declares (its
    quantizer, policies and ptq), else the components themselves: `lsq+dampen+freeze`,
    `fp+osc_reg`, `ptq` (so `method=lsq policy=[dampen]` is never filed as plain lsq)."""
    declared = (method.quantizer, sorted(method.policies), method.ptq)
    if (quantizer, sorted(policies), ptq) == declared:
        return str(method.name)
    base = quantizer if quantizer != "none" else ("ptq" if ptq else "fp")
    return "+".join([base, *policies])


def run_dir_name(cfg: DictConfig, overrides: list[str] | None = None) -> str:
    """`<method>/<bits>-<model>-<dataset>-s<seed>[-<other overrides>]` for a composed config
    (with its `hydra` node): rerunning a command finds its run. The other overrides are
    Hydra's `override_dirname` (its `exclude_keys`, separators and order) with a path given
    to `init_from` or `teacher` shortened to its last part and a hash of the whole
    (`teacher:fp32-cnn_small-digits-s0~3f2a1c`), so that the name stays one short directory.
    `overrides`: those that name it, if not the job's own (`hydra.overrides.task`)."""
    bits = bits_label(cfg.bits, cfg.act_bits, cfg.quantizer.name, cfg.act_quantizer.name, cfg.ptq)
    name = f"{cfg.method.name}/{bits}-{cfg.model.name}-{cfg.dataset.name}-s{cfg.seed}"
    return name + overrides_suffix(override_dirname(cfg.hydra, overrides))


def _short(value: str) -> str:
    """A path as its last part and a hash of the whole; any other value as it is."""
    if "/" not in value:
        return value
    digest = hashlib.sha1(value.encode()).hexdigest()[:6]
    return f"{PurePath(value).name or 'root'}~{digest}"


def override_dirname(hydra: DictConfig, overrides: list[str] | None = None) -> str:
    """Hydra's `hydra.job.override_dirname` of the job's overrides (or `overrides`), paths
    shortened."""
    how = hydra.job.config.override_dirname
    lines = []
    given = list(hydra.overrides.task) if overrides is None else overrides
    for o in OverridesParser.create().parse_overrides(given):
        if o.key_or_group in how.exclude_keys:
            continue
        line = o.input_line
        if o.key_or_group in PATH_KEYS and not o.is_sweep_override():
            head = line[: line.index("=") + 1]
            line = head + _short(o.get_value_element_as_str())
        lines.append(line)
    return re.sub("=", how.kv_sep, how.item_sep.join(sorted(lines)))


def overrides_suffix(override_dirname: str) -> str:
    """`-<overrides>` with path separators flattened, or nothing."""
    return f"-{override_dirname.replace('/', '_')}" if override_dirname else ""


def result_key(ptq: bool, bits: int, prefix: str = "") -> str:
    """The final metric that is a run's result on a split (`prefix`: "" for test, "val_"
    for validation): accuracy after BN re-estimation; a PTQ run's, its weights rounded to
    `bits`."""
    return f"{prefix}acc@{bits}bit" if ptq else f"{prefix}acc_bn"


OmegaConf.register_new_resolver(
    "oscbench_run_name", lambda *, _root_: run_dir_name(_root_), replace=True
)
OmegaConf.register_new_resolver("oscbench_suffix", overrides_suffix, replace=True)  # the toys
