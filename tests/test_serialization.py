"""save/load: one file, weights_only loading, atomic writes, any backend, clear errors."""

from __future__ import annotations

import pytest
import torch

import allegro_fast as af
from allegro_fast.testing import TOLERANCE, assert_close

from conftest import ethanol, periodic_cho, randomize_edge_scale, small_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_keeps_the_function(tmp_path, dtype):
    torch.manual_seed(0)
    model = af.Allegro(small_config()).to(dtype)
    randomize_edge_scale(model)
    graph = af.AtomicGraph.from_ase([ethanol(1), periodic_cho(2)], r_max=model.config.r_max)
    expected = model(graph)
    af.save(model, tmp_path / "model.pt", metadata={"note": "test"})
    loaded = af.load(tmp_path / "model.pt")
    assert isinstance(loaded, af.Allegro) and loaded.dtype == dtype
    assert loaded.config == model.config and loaded.metadata["note"] == "test"
    out = loaded(graph)
    for key in ("energy", "forces", "stress"):
        assert torch.equal(out[key], expected[key])
    reference = af.load(tmp_path / "model.pt", backend="reference")
    assert isinstance(reference, af.reference.ReferenceAllegro)
    assert_close(reference(graph)["forces"], expected["forces"], "reference from file", TOLERANCE[dtype])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_file_is_readable_with_weights_only(tmp_path):
    af.save(af.Allegro(small_config()), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "allegro-fast" and "state_dict" in payload


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        af.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt is not a readable allegro-fast model file"):
        af.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not an allegro-fast model file"):
        af.load(tmp_path / "other.pt")
