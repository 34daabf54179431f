"""Importers of real capture formats into the capture layout (metres, OpenCV cameras, no lens distortion).

An import is all or nothing: every participant is converted into a staging folder first and moved into `--out`
only when all of them succeeded, so a refused import leaves `--out` as it was. A participant or sequence that
cannot be imported is an error naming it; only with `skip_bad` is it left out instead, each one reported (and
counted) in the returned `ImportReport`. Subject ids are the source's participant folder names, unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

from data_pipelines import layout
from data_pipelines.importers import multiface, nersemble
from data_pipelines.layout import LayoutError

logger = logging.getLogger(__name__)

FORMATS = ("nersemble", "multiface")
ImportOptions = nersemble.NersembleOptions | multiface.MultifaceOptions


@dataclasses.dataclass
class ImportReport:
    """What an import did: notes per imported subject, and every item left out (only with skip_bad)."""

    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (participant[/sequence], reason)

    def skip(self, item: str, error: LayoutError) -> None:
        logger.warning("SKIPPED %s: %s", item, error)
        self.skipped.append((item, str(error)))


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def import_capture(
    format_name: str,
    src: Path,
    out_root: Path,
    options: ImportOptions,
    *,
    skip_bad: bool = False,
) -> ImportReport:
    """Imports every participant under `src` into `out_root/subjects/<id>` (see the module docstring)."""
    if format_name == "nersemble":
        find, import_one = nersemble.find_participants, nersemble.import_participant
    elif format_name == "multiface":
        find, import_one = multiface.find_participants, multiface.import_participant
    else:
        raise ValueError(f"unknown capture format {format_name!r}; known: {', '.join(FORMATS)}")
    report = ImportReport()
    participants, unusable = find(Path(src))
    for folder, error in unusable:
        if not skip_bad:
            raise error
        report.skip(folder.name, error)
    out_root = Path(out_root)
    anchor = out_root if out_root.is_dir() else _existing_ancestor(out_root.parent)
    staging = Path(tempfile.mkdtemp(prefix=".uhap-import-", dir=anchor))
    try:
        for participant in participants:
            try:
                report.notes[participant.name] = import_one(
                    participant, staging, options, on_bad_sequence=report.skip if skip_bad else None
                )
            except LayoutError as error:
                if not skip_bad:
                    raise
                report.skip(participant.name, error)
        if not report.notes:
            raise LayoutError(f"{src}: no participant could be imported ({len(report.skipped)} skipped)")
        (out_root / "subjects").mkdir(parents=True, exist_ok=True)
        for subject in report.notes:
            layout.replace_dir(layout.subject_dir(staging, subject), layout.subject_dir(out_root, subject))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
