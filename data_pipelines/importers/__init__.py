"""Importers of real capture formats into the capture layout (metres, OpenCV cameras, no lens distortion).

Each importer converts one participant at a time inside `layout.staged_dir`, so a bad file anywhere leaves
no half-written subject behind. Subject ids are the source's participant folder names, unchanged.
"""

from __future__ import annotations

from pathlib import Path

from data_pipelines.importers import multiface, nersemble

FORMATS = ("nersemble", "multiface")
ImportOptions = nersemble.NersembleOptions | multiface.MultifaceOptions


def import_capture(
    format_name: str,
    src: Path,
    out_root: Path,
    options: ImportOptions,
) -> dict[str, list[str]]:
    """Imports every participant under `src` into `out_root`; returns the notes per subject id."""
    if format_name == "nersemble":
        participants, import_one = nersemble.find_participants(src), nersemble.import_participant
    elif format_name == "multiface":
        participants, import_one = multiface.find_participants(src), multiface.import_participant
    else:
        raise ValueError(f"unknown capture format {format_name!r}; known: {', '.join(FORMATS)}")
    return {participant.name: import_one(participant, out_root, options) for participant in participants}
