"""Exports are written whole or not at all, and a missing one names the command that makes it."""
from __future__ import annotations

import pytest

from ernie_lab import artifacts
from ernie_lab.errors import MissingArtifactError


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "export"
    with artifacts.atomic_dir(final) as work:
        (work / "model.pdmodel").write_text("v1")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(final) as work:
            (work / "model.pdmodel").write_text("half of v2")
            raise RuntimeError("killed mid-export")
    assert (final / "model.pdmodel").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind
    with artifacts.atomic_dir(final) as work:
        (work / "model.pdmodel").write_text("v2")
    assert (final / "model.pdmodel").read_text() == "v2"


def test_manifest_listing_a_missing_file_is_rejected(tmp_path):
    artifacts.write_json_atomic(tmp_path / artifacts.MANIFEST, {"files": ["model.pdmodel"]})
    with pytest.raises(MissingArtifactError, match="re-run `python compress.py`"):
        artifacts.read_manifest(tmp_path, "python compress.py")
    with pytest.raises(MissingArtifactError, match="make it with `python compress.py`"):
        artifacts.read_manifest(tmp_path / "absent", "python compress.py")
