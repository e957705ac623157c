"""The compat module names every private internal that a library version lacks."""

from __future__ import annotations

import pytest

from phi2cli import compat


def test_every_listed_internal_exists_in_the_installed_libraries():
    assert {owner: compat.missing(owner) for owner in compat.INTERNALS} == {owner: [] for owner in compat.INTERNALS}


def test_a_missing_internal_is_named_with_the_checked_versions(monkeypatch):
    monkeypatch.setitem(compat.INTERNALS, "torch", ("_foreach_copy_", "_no_such_internal"))
    monkeypatch.setattr(compat, "_checked", set())
    with pytest.raises(ImportError, match=r"torch\._no_such_internal \(checked on torch 2\.11/2\.13"):
        compat.require("torch")


def test_dynamo_settings_are_scoped_to_the_block():
    import torch._dynamo

    before = torch._dynamo.config.cache_size_limit
    with compat.dynamo_settings(cache_size_limit=before + 7):
        assert torch._dynamo.config.cache_size_limit == before + 7
    assert torch._dynamo.config.cache_size_limit == before
    assert torch._dynamo.config.suppress_errors is False  # nothing sets it process-wide
