"""Copies from page-locked memory are cut where one registration ends and the next begins."""

from __future__ import annotations

import torch

from tandem.gpu import cudart


def test_a_range_is_cut_at_every_registration_edge_inside_it(monkeypatch):
    data = torch.zeros(10_000, dtype=torch.uint8)
    base = data.data_ptr()
    # Two registrations meeting at byte 4096 of the tensor, the second ending at 8192,
    # and one wholly elsewhere.
    monkeypatch.setattr(
        cudart, "_registered", [(base - 100, base + 4096), (base + 4096, base + 8192), (1, 2)]
    )
    assert cudart.registration_pieces(data) == [(0, 4096), (4096, 8192), (8192, 10_000)]
    words = data.view(torch.int32)  # edges counted in elements
    assert cudart.registration_pieces(words) == [(0, 1024), (1024, 2048), (2048, 2500)]


def test_no_registration_leaves_one_piece(monkeypatch):
    monkeypatch.setattr(cudart, "_registered", [])
    assert cudart.registration_pieces(torch.zeros(7)) == [(0, 7)]


def test_copies_from_unlocked_memory_keep_the_bytes(monkeypatch):
    data = torch.arange(5000, dtype=torch.int32)
    base = data.data_ptr()
    monkeypatch.setattr(cudart, "_registered", [(base + 400, base + 12_000)])
    out = cudart.copy_to_device(data.view(50, 100), torch.device("cpu"))
    assert out.shape == (50, 100) and torch.equal(out.reshape(-1), data)
