"""Discovery of golden case folders (made by running the official code; see shared/golden/README.md).

Case folders are read from the colon-separated paths in ``INFINITYSTAR_GOLDEN_DIRS``
(default ``../shared/golden`` relative to the repository root). A path may be a case folder itself or a folder with
case folders anywhere below it (a few levels deep). Tests dispatch on ``manifest["kind"]``, never on names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN = REPO_ROOT.parent / "shared" / "golden"


def golden_roots() -> list[Path]:
    raw = os.environ.get("INFINITYSTAR_GOLDEN_DIRS")
    paths = [Path(p) for p in raw.split(":") if p] if raw else [DEFAULT_GOLDEN]
    return [p for p in paths if p.is_dir()]


MAX_DEPTH = 4  # folders of folders of cases: how deep a root is searched


def _cases_under(folder: Path, depth: int = 0) -> list[Path]:
    """``folder`` if it is a case (holds manifest.json), else the cases below it, in name order; a case folder's
    own subfolders are not searched."""
    if (folder / "manifest.json").is_file():
        return [folder]
    if depth >= MAX_DEPTH:
        return []
    try:
        children = sorted(d for d in folder.iterdir() if d.is_dir())
    except OSError:
        return []
    return [case for d in children for case in _cases_under(d, depth + 1)]


def _case_dirs() -> list[Path]:
    found: dict[str, Path] = {}
    for root in golden_roots():
        for d in _cases_under(root):
            found.setdefault(str(d.resolve()), d)
    return list(found.values())


def load_manifest(case_dir: Path) -> dict:
    return json.loads((case_dir / "manifest.json").read_text())


def cases(*kinds: str) -> list:
    """pytest params for every case whose manifest kind is in ``kinds``; id = folder name."""
    params = []
    for d in _case_dirs():
        if load_manifest(d).get("kind") in kinds:
            params.append(pytest.param(d, id=d.name))
    if not params:
        reason = (f"no golden case of kind {kinds} under INFINITYSTAR_GOLDEN_DIRS="
                  f"{os.environ.get('INFINITYSTAR_GOLDEN_DIRS', str(DEFAULT_GOLDEN))}")
        params.append(pytest.param(None, id="no-cases", marks=pytest.mark.skip(reason=reason)))
    return params


def checkpoint_keys_dir() -> Path | None:
    """The folder holding the full-size key lists, found by its files, never by its name."""
    for root in golden_roots():
        for d in [root / "checkpoint_keys", root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            if (d / "vae_full.json").is_file() or (d / "transformer_720p.json").is_file():
                return d
    return None
