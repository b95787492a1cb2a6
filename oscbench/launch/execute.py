"""One configuration end to end: skip a completed run, resume a checkpoint, train the fp
run it starts from first, then train, record and export."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from oscbench.distributed import from_env
from oscbench.launch.build import build, extra_metrics, measurements
from oscbench.launch.compose import compose, method_free, presets, without_recipe
from oscbench.launch.config import RunSpec, resolved, validate
from oscbench.launch.naming import run_dir_name
from oscbench.launch.summary import print_summary, show_completed
from oscbench.records.checkpoint import CHECKPOINT, FINAL_MODEL, save_atomic
from oscbench.records.console import epoch_line, say, warn
from oscbench.records.record import Recorder, machine
from oscbench.records.reuse import claim, dependency
from oscbench.records.runs import fingerprint, run_key
from oscbench.training.evaluation import final_metrics, gap_recovered, split_record
from oscbench.training.loop import Trainer


def run_name(spec: RunSpec) -> str:
    """The run's name in W&B."""
    return f"{spec.method}-{spec.bits_label}-{spec.model.name}-{spec.dataset.name}-s{spec.seed}"


def fp_counterpart(overrides: list[str]) -> tuple[RunSpec, dict, str]:
    """The full-precision run a quantized run starts from with `init_from=fp`: Hydra
    composes the run's overrides that do not concern the method with `method=fp`, and the
    fp preset's own group choices (which an experiment's defaults may have overridden).
    Returns its spec, its resolved config and its run directory's name: that of a plain
    `method=fp` run with the overrides that make its identity (`recipe=paper` as the recipe
    it resolved to; no `teacher`, `distill`, `finetune_lr` or `finetune_epochs`, which an FP
    run ignores, nor `bn_fold`, which it refuses). A recipe whose paper fine-tunes a standard
    pretrained model (`recipe.fp: common`) starts from the fp run of the common recipe."""
    # nothing to fold in full precision: a folded run (bn_fold) starts from the plain fp run
    kept = [*method_free(overrides, also=("bn_fold",)), "method=fp"]
    (fp,) = [p for p in presets() if p.name == "fp"]
    cfg = compose([*kept, *fp.choices])
    if cfg.recipe.get("fp") == "common":  # a paper that fine-tunes a standard pretrained model
        kept = without_recipe(kept)
        cfg = compose([*kept, *fp.choices])
    config = resolved(cfg)
    own = fingerprint(config)
    named = []
    for o in OverridesParser.create().parse_overrides(kept):
        key = o.key_or_group
        if key == "recipe":
            named.append(f"recipe={config['recipe']['name']}")
        elif any(k == key or k.startswith(key + ".") for k in own):
            named.append(o.input_line)
    name = run_dir_name(compose(kept, hydra_node=True), named)
    return validate(cfg), config, name


def identified(config: dict, overrides: list[str]) -> dict:
    """The run's resolved config, and for a run that starts from or distils the fp run
    (`init_from=fp`, `teacher=fp`) that run's identity (`fp_run`: its recipe, and the key of
    its configuration less the seed, which is the run's own): runs whose own configs are
    alike but whose fp runs differ (`recipe=paper` against `recipe=wenshoj2025` for osc_reg:
    its fp run trains under the common recipe in the first, under Wenshoj et al.'s in the
    second) are different runs, and the seeds of one cell still differ in nothing but the
    seed."""
    if "fp" not in (config.get("init_from"), config.get("teacher")):
        return config
    _, fp_config, _ = fp_counterpart(overrides)
    key = run_key({k: v for k, v in fp_config.items() if k != "seed"})
    return config | {"fp_run": {"recipe": fp_config["recipe"]["name"], "key": key}}


def ensure_fp(overrides: list[str], root: Path, asked: str) -> Path:
    """The directory of the completed fp run below `root` that a run with these overrides
    starts from or distils (`asked`: which setting asked for it); trained first (once,
    whichever job gets there first) if there is none. On several processes rank 0 looks
    and every rank follows its answer, training the fp run together."""
    fp_spec, fp_config, name = fp_counterpart(overrides)

    def train() -> None:
        fp_dir = root / name
        say(f"oscbench: {asked}: no completed fp run yet; training one in {fp_dir}")
        execute(fp_spec, fp_config, fp_dir, overrides, search_root=root, fp_root=root)

    return dependency(root, fp_config, train, from_env())


def execute(
    spec: RunSpec,
    config: dict,
    run_dir: Path,
    overrides: list[str],
    search_root: Path | None = None,
    fp_root: Path | None = None,
) -> dict:
    """Run one configuration end to end; returns the final metrics (also in results.json).

    With `trainer.resume=auto` a completed run of the same configuration anywhere below
    `search_root` (default: the run directory) is not trained again, and a checkpoint in the
    run directory is resumed. A lock per configuration keeps parallel jobs from training the
    same run twice. `init_from=fp` and `teacher=fp` take the fp run below `fp_root`
    (composed from `overrides`, the run's command-line overrides), trained first if needed."""
    search_root = search_root or run_dir
    config = identified(config, overrides)
    world = from_env()  # several processes: rank 0 locks and decides, the others follow
    with claim(search_root, run_dir, config, world, spec.trainer.resume == "auto") as found:
        if found.done is not None:
            record = show_completed(spec, found.done, "trainer.resume=never trains it again")
            if "export" not in record and world.main:
                export_if_asked(spec, found.done)
            return record["final"]
        asked = [f"{k}=fp" for k in ("init_from", "teacher") if getattr(spec, k) == "fp"]
        if asked:
            fp = str(ensure_fp(overrides, fp_root or run_dir.parent.parent, " and ".join(asked)))
            spec = dataclasses.replace(
                spec,
                init_from=fp if spec.init_from == "fp" else spec.init_from,
                teacher=fp if spec.teacher == "fp" else spec.teacher,
            )
        spec = spec.as_trained()
        not_applied = config["recipe"].get("not_applied")
        if not_applied:
            say(
                f"oscbench: under recipe={spec.recipe}, quantizer={spec.quantizer.name} and "
                f"act_quantizer={spec.act_quantizer.name} have no {', '.join(not_applied)}: "
                "not applied (the record lists them under recipe.not_applied)"
            )
        return _train_and_record(spec, config, run_dir, found.resume)


def _train_and_record(spec: RunSpec, config: dict, run_dir: Path, resume: dict | None) -> dict:
    built = build(spec)
    epochs = spec.trainer.epochs + spec.trainer.extra_epochs
    labels = {"method": spec.method, "bits": spec.bits_label}
    world = built.data.world
    where = machine(str(built.data.device), world.size)
    rec = Recorder(
        run_dir, config, spec.logger, labels, run_name(spec), where, resume, writes=world.main
    )
    rec.data["splits"] = split_record(built.data, spec.trainer)
    if resume is not None:
        say(f"oscbench: resuming {run_dir} after epoch {resume['epoch']} of {epochs}")
    save = None
    if spec.trainer.checkpoint and world.main:
        stamp = fingerprint(config)

        def save(state: dict) -> None:
            state |= {"fingerprint": stamp, "elapsed_s": rec.elapsed}
            save_atomic(state, run_dir / CHECKPOINT)

    last = [0.0]

    def on_epoch(record: dict) -> None:
        rec.log_epoch(record)
        now = time.time()
        say(epoch_line(record, epochs, now - last[0]))
        last[0] = now

    with rec:
        last[0] = time.time()
        trainer = Trainer(
            built.model,
            built.data,
            spec.trainer,
            built.policies,
            built.tracker,
            built.objective,
            built.ema,
        )
        if resume is not None:
            trainer.load_state_dict(resume)
        history = trainer.fit(on_epoch, save=save, measure=measurements(spec, built))
        cross_bits = spec.cross_bits + ([spec.bits] if spec.ptq else [])
        final = final_metrics(
            built.model,
            built.data,
            built.tracker,
            history,
            spec.trainer,
            spec.bits,
            cross_bits,
            spec.plan,
        )
        final |= extra_metrics(spec, built)
        if built.init is not None:
            final["init"] = built.init
            final |= gap_recovered(final)
        if world.main:
            save_atomic(built.model.state_dict(), run_dir / FINAL_MODEL)
        final["wall_time_s"] = rec.elapsed
        rec.finish(final)
    if world.main:  # the record is complete: printing cannot change it
        print_summary(spec, rec.data, rec.path)
        export_if_asked(spec, run_dir)
    return final


def export_if_asked(spec: RunSpec, run_dir: Path) -> None:
    """`export=true`: the completed run to ONNX with its parity (`oscbench.launch.export`). The
    record is complete already: an export that fails says why and leaves it as it is."""
    if not spec.export:
        return
    from oscbench.launch.export import export_run, summary  # onnx: imported where it is used

    try:
        say(summary(export_run(run_dir)))
    except Exception as e:  # noqa: BLE001  (the run's record must outlive any export failure)
        warn(
            f"export of {run_dir} failed ({type(e).__name__}: {e}); the record is unchanged. "
            f"python -m oscbench.export {run_dir} shows the whole error"
        )
