"""Output folders that never cost a user their data: what a command may replace, and how it replaces it.

A command writes its result (a bundle, an avatar, a dataset) into a folder it may replace only when that folder
is missing, empty, or carries our own manifest of the same kind; never when it is, contains or lies inside one of
the command's inputs. A training workdir is never replaced but written into and resumed, so it may be missing,
empty or one of the same stage's runs (`check_workdir`): never a folder of the user's own files, another stage's
run, or an input. Replacing writes into a unique staging folder beside the target, moves the old folder
aside, moves the new one in, and only then deletes the old one: an interruption at any point leaves either the
old or the new folder in place (at worst the old one under `.<name>.old-*`), and two runs never share a staging
folder. A failed write removes its staging folder and leaves the target as it was.

Small files that a crash must not tear (caches) are written through `save_npz_atomic`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from data_pipelines.layout import replace_dir
from uhap_jax.config_utils import UsageError, write_atomic

__all__ = [
    "KINDS",
    "check_replaceable",
    "check_resumable",
    "check_workdir",
    "overlapping_input",
    "replace_dir",
    "replacing",
    "save_npz_atomic",
    "workdir_stage",
]


def _kind_is(value: str, field: str = "kind") -> Callable[[dict], bool]:
    return lambda manifest: manifest.get(field) == value


# kind -> (manifest file, test on its JSON object): what marks a folder as one of ours that may be replaced.
KINDS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "bundle": ("bundle.json", _kind_is("uhap_prior")),
    "avatar": ("avatar.json", _kind_is("uhap_avatar")),
    "dataset": ("dataset.json", _kind_is("uhap data synth", field="generator")),
}


def _manifest(folder: Path, kind: str) -> bool:
    """Whether `folder` carries our manifest of `kind` (a readable JSON object that says so)."""
    name, accepts = KINDS[kind]
    try:
        payload = json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and accepts(payload)


def overlapping_input(out: Path, inputs: Sequence[Path | str | None]) -> Path | None:
    """The first input that `out` is, contains or lies inside (symbolic links resolved), else None."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = Path(item).resolve()
        if target == source or target in source.parents or source in target.parents:
            return Path(item)
    return None


def _refuse_overlap(out: Path, inputs: Sequence[Path | str | None], flag: str) -> None:
    clash = overlapping_input(out, inputs)
    if clash is not None:
        relation = ("is" if out.resolve() == clash.resolve() else
                    "lies inside" if clash.resolve() in out.resolve().parents else "contains")  # fmt: skip
        raise UsageError(f"{flag} {out}: {relation} the input {clash}; writing there would destroy it, so give "
                         "another folder")  # fmt: skip


def check_replaceable(out: Path, kind: str, *, inputs: Sequence[Path | str | None] = (), flag: str = "--out") -> Path:
    """Refuses (UsageError, one line naming `flag`) an output folder that the command may not replace."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}")
    out = Path(out)
    _refuse_overlap(out, inputs, flag)
    if out.is_symlink():
        raise UsageError(f"{flag} {out}: is a symbolic link; give the folder itself or a new path")
    if not out.exists():
        return out
    if not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file, not a folder; give a new or empty folder")
    if any(out.iterdir()) and not _manifest(out, kind):
        manifest = KINDS[kind][0]
        raise UsageError(f"{flag} {out}: holds files but is not a {kind} written by uhap (no {manifest} of one); "
                         f"give a new or empty folder, or remove {out} yourself")  # fmt: skip
    return out


def check_resumable(folder: Path, marker: str, command: str, *, flag: str = "--workdir") -> Path:
    """Refuses (UsageError, one line naming `flag`) a workdir that `command` would write over a user's files in: it
    may be missing, empty, or hold `marker`, what `command` leaves in its own workdirs (which it then resumes)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: is a file; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).exists():
        raise UsageError(f"{flag} {folder}: holds files but no `{command}` run (no {marker}); give a new or empty "
                         f"folder, or remove {folder} yourself")  # fmt: skip
    return folder


STAGES = ("prior", "audio", "encoder")


def workdir_stage(workdir: Path) -> str | None:
    """The `uhap train` stage ('prior', 'audio' or 'encoder') whose run `workdir` holds, by keys its config.json has
    had since each stage's first version (a speech model's names its audio encoder, an encoder's only its prior, a
    prior's neither but its UV resolution); None when there is no such config.json."""
    try:
        config = json.loads((Path(workdir) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    if "encoder_path" in config:
        return "audio"
    if "prior_workdir" in config:
        return "encoder"
    model = config.get("model")
    return "prior" if isinstance(model, dict) and "uv_resolution" in model else None


def check_workdir(workdir: Path, stage: str, *, inputs: Sequence[Path | str | None] = (),
                  flag: str = "--workdir") -> Path:  # fmt: skip
    """Refuses (UsageError, one line naming `flag`) a training workdir that writing into would cost data: one that
    is, holds or lies inside an input, a file, another stage's run, or a folder of files no `uhap train` wrote (its
    config.json would be overwritten). A missing or empty folder starts a run; one of `stage`'s resumes it."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; known: {', '.join(STAGES)}")
    workdir = Path(workdir)
    _refuse_overlap(workdir, inputs, flag)
    check_resumable(workdir, "config.json", "uhap train", flag=flag)
    if not (workdir / "config.json").exists():
        return workdir
    found = workdir_stage(workdir)
    if found is None:
        raise UsageError(f"{flag} {workdir}: its config.json is not one `uhap train` wrote; give a new or empty "
                         f"folder, or remove {workdir} yourself")  # fmt: skip
    if found != stage:
        raise UsageError(f"{flag} {workdir}: holds a `uhap train {found}` run; give `uhap train {stage}` a folder "
                         "of its own")  # fmt: skip
    return workdir


@contextlib.contextmanager
def replacing(out: Path, kind: str, *, inputs: Sequence[Path | str | None] = (), flag: str = "--out") -> Iterator[Path]:
    """Yields a new empty staging folder beside `out`; on success it becomes `out` (see the module docstring).

    The checks run before the block (so nothing is computed for a refused folder) and again after it (the folder
    may have changed meanwhile). The block must write the kind's manifest into the staging folder.
    """
    out = check_replaceable(Path(out), kind, inputs=inputs, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        check_replaceable(out, kind, inputs=inputs, flag=flag)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez` whose file is complete or absent: a run killed while writing a cache leaves the old cache or none,
    never a torn one."""
    write_atomic(path, lambda stream: np.savez(stream, **arrays))
