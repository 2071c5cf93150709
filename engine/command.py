"""What every training command (pretrain, supervised, finetune) does around `fit`.

Its data, decoded once (rank 0 first); its run directory, named by the resume key so the same
command finds the same run; the resume check before anything is written there; and the data
facts its config.json records.
"""
from __future__ import annotations

from pathlib import Path

from . import dist
from .config import size_warning, to_dict
from .data.dataset import Dataset, load_dataset, save_data_files
from .data.index import DataError
from .keys import changed_settings, moved_away, only_moved, recorded_at, resume_keys
from .models import is_start_file
from .runs import OUTPUTS, Run, log


def load_data(cfg, need_labels: bool = False) -> Dataset:
    """The command's data set: rank 0 scans and decodes the cache, the others then map it;
    inputs larger than the cache are said. A command that trains a classifier (need_labels)
    refuses one class: its loss is 0 from the first step and its top-1 is 1."""
    with dist.main_first():
        ds = load_dataset(cfg.data, need_labels=need_labels, log=log)
        if warning := size_warning(cfg):
            log(warning)
    if need_labels:
        check_two_classes(ds)
    return ds


def check_two_classes(ds: Dataset) -> None:
    """A classifier's data needs two classes (finetune, supervised, reproduce)."""
    if len(ds.class_names) < 2:
        raise DataError(f"--data has one class ({ds.class_names[0]!r}): a classifier needs at "
                        "least two")


def begin(run: Run, cfg, ds: Dataset, inputs: str) -> None:
    """A run's first writes, once its checkpoint may be continued (check_resumable): the list
    of its data files (rank 0)."""
    check_same_everywhere(run, cfg, inputs)
    check_resumable(run, cfg, inputs)
    if run.is_main:
        save_data_files(ds, run.path)


# Runtime values every rank must share besides the settings: collectives happen at the
# log-every and checkpoint-every steps, and every rank reads the run's checkpoint (or, with
# --no-resume, rank 0 clears it while the others would read it).
SHARED_RUNTIME = ("log_every", "checkpoint_every", "resume")


def check_same_everywhere(run: Run, cfg, inputs: str) -> None:
    """torchrun: every process must train the same settings on the same inputs in the same
    run directory. A rank given another --lr trained a diverging replica unsaid; another
    --epochs or --log-every left the others waiting in a collective until the timeout. Where
    the inputs are may differ (another node's mount) when what they hold does not. Each rank
    says how its own differ from rank 0's."""
    mine = {"settings": resume_keys(cfg)[0], "inputs": inputs, "run": run.path.name,
            **{k: getattr(cfg.runtime, k) for k in SHARED_RUNTIME}}
    everyone = dist.gather(mine)
    if all(d == everyone[0] for d in everyone):
        return
    first, zero = dist.gather(to_dict(cfg))[0], everyone[0]
    diff = [f"{k}: {zero[k]} -> {v}" for k, v in mine.items()
            if k not in ("settings", "inputs") and v != zero[k]]
    if mine["inputs"] != zero["inputs"]:
        diff.append("inputs (the data or weights files hold other bytes)")
    elif mine["settings"] != zero["settings"] and not only_moved(first, cfg):
        diff = (changed_settings(first, cfg) or ["settings"]) + diff
    bad = [r for r, b in enumerate(dist.gather(bool(diff))) if b]
    if not bad:  # only where the inputs are differs
        return
    said = (f"differs from rank 0's ({'; '.join(diff[:6])})" if diff else
            f"is rank 0's, but rank(s) {', '.join(map(str, bad))} differ")
    raise SystemExit(f"rank {dist.rank()}: the processes of this run were started with other "
                     f"settings; this one's {said}. Start every process with the same command")


def data_record(ds: Dataset) -> dict:
    """config.json's `data`: where the images came from, and which they were."""
    return {"synthetic": ds.synthetic, "root": str(ds.root), "fingerprint": ds.fingerprint()}


def run_name(cfg, prefix: str) -> str:
    """A run's directory when --name is not given: `prefix` and its resume key, so the same
    command (its paths spelled any way) finds the same directory and resumes. A directory
    named by an earlier version's key (resume_keys) is kept when it is the one there."""
    key, *earlier = resume_keys(cfg)
    out = Path(cfg.runtime.out).expanduser()
    new = f"{prefix}-{key[:8]}"
    if (out / new).exists():
        return new
    name = next((f"{prefix}-{k[:8]}" for k in earlier if (out / f"{prefix}-{k[:8]}").is_dir()),
                new)
    if name == new and cfg.runtime.resume:
        for moved in _moved_runs(out, prefix, cfg):  # the same run with its inputs elsewhere
            log(f"note: {out / moved} is a run of these settings whose inputs were elsewhere "
                f"(moved since?); this starts a new run. To continue that one instead, pass "
                f"--name {moved}")
    return name


def _moved_runs(out: Path, prefix: str, cfg) -> list[str]:
    """Run directories named like this command's whose recorded config differs from `cfg`
    only in where the inputs are, the places it recorded being gone (keys.moved_away): the
    run it made before they moved."""
    try:
        found = sorted(d for d in out.glob(f"{prefix}-*") if d.is_dir())
    except OSError:
        return []
    return [d.name for d in found if (rec := recorded_at(d)) is not None
            and moved_away(rec, cfg)]


def check_resumable(run: Run, cfg, inputs: str) -> None:
    """Before a command writes into its run directory, decide where it starts: its checkpoint
    (run.found, which fit loads), refused when of other settings or other inputs so that a
    refused rerun leaves the run's files as they were; or, with --no-resume, the beginning,
    the old run cleared out."""
    _check_same_command(run, cfg)
    if cfg.runtime.resume:
        run.found = run.resume(resume_keys(cfg), inputs, changes=lambda: _changes(run, cfg),
                               moved=lambda: _only_moved(run, cfg))
    else:  # starting over: nothing of the old run may pass for this one's
        _check_inputs_outside(run, cfg)
        run.start_over()
        run.again = "the same command again without --no-resume"  # with it, it would start over


def command_of(config) -> str | None:
    """Which training command a config (a dataclass, or a recorded dict) belongs to, by the
    fields only it has: finetune's fraction, pretrain's method, and of the two left the lr
    schedule supervised has; None for a shape none has (an old version's)."""
    fields = config if isinstance(config, dict) else vars(config)
    for command, field in (("finetune", "fraction"), ("pretrain", "method"),
                           ("supervised", "schedule")):
        if field in fields:
            return command
    return None


def _check_same_command(run: Run, cfg) -> None:
    """A run directory of another command is never continued nor, with --no-resume, cleared:
    `--name` naming a pretraining's folder for a fine-tuning would otherwise delete the
    encoder the user may be fine-tuning from."""
    recorded = recorded_at(run.path)
    theirs, ours = command_of(recorded or {}), command_of(cfg)
    if theirs is not None and theirs != ours:
        raise SystemExit(f"{run.path} holds an `sstl {theirs}` run; give this `sstl {ours}` "
                         "run another --name")


def _check_inputs_outside(run: Run, cfg) -> None:
    """--no-resume clears the run directory (Run.start_over: its checkpoints and OUTPUTS):
    refused where the command reads its start from one of those files (an --init or
    --encoder file, or the folder itself), which would be gone before it is read."""
    here = run.path.resolve()
    cleared = {*OUTPUTS, run.checkpoint.name, run.previous.name}
    for flag in ("encoder", "init"):
        value = getattr(cfg, flag, None)
        if value is None or not is_start_file(value):
            continue
        p = Path(value).expanduser().resolve()
        if p == here or (p.parent == here and p.name in cleared):
            raise SystemExit(f"--{flag} {value} is in {run.path}, which --no-resume would "
                             "clear before reading it; give this run another --name")


def _only_moved(run: Run, cfg) -> bool:
    recorded = recorded_at(run.path)
    return recorded is not None and only_moved(recorded, cfg)


def _changes(run: Run, cfg) -> str:
    """' (epochs: 4 -> 5; ...)': the settings in which the run's config.json differs."""
    recorded = recorded_at(run.path)
    changed = changed_settings(recorded, cfg) if recorded is not None else []
    return f" ({'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''})" if changed else ""
