"""No hub: found out in seconds, every missing item named at once with its local alternative; what is cached
is loaded offline."""

from __future__ import annotations

import socket
import time

import pytest
from typer.testing import CliRunner

from phi2cli.cli import app
from phi2cli.config import Phi2Config, apply_overrides
from phi2cli.errors import HubUnreachableError
from phi2cli.io import hub


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def no_hub(monkeypatch):
    """HF_HUB_OFFLINE unset and the hub endpoint a closed local port; offline switches are undone afterwards."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probed", {})
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    except ImportError:
        pass
    return constants


def test_train_without_hub_names_model_tokenizer_and_dataset_in_seconds(no_hub):
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "--samples", "5"], env={"COLUMNS": "400"})
    seconds = time.perf_counter() - started
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: the Hugging Face hub is unreachable ({hub._endpoint()}) and the local cache lacks: "
        "model 'microsoft/phi-2' (use --model DIR|FILE.gguf); tokenizer 'microsoft/phi-2' (use --model "
        "DIR|FILE.gguf, or --tokenizer DIR); dataset 'EdinburghNLP/xsum' (use --data-dir DIR with train.jsonl and "
        "validation.jsonl)"]  # fmt: skip
    assert seconds < hub.PROBE_TIMEOUT_S + 5, seconds
    assert no_hub.HF_HUB_OFFLINE is True  # the libraries would not retry either


def test_prepare_without_hub_names_only_what_it_needs(no_hub, sample_data_dir):
    result = CliRunner().invoke(app, ["prepare", "--data-dir", str(sample_data_dir)], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert ("lacks: tokenizer 'microsoft/phi-2' (use --model DIR|FILE.gguf, or --tokenizer DIR)\n"
            in result.output)  # fmt: skip
    assert "dataset" not in result.output and "model 'microsoft" not in result.output


def test_with_hf_hub_offline_set_every_missing_item_is_named_too():
    config = apply_overrides(Phi2Config(), {"model.model": "acme/tiny", "data.dataset": "acme/news"})
    with pytest.raises(HubUnreachableError) as raised:
        hub.check_hub_access(config, data=True)
    assert str(raised.value) == (
        "HF_HUB_OFFLINE is set and the local cache lacks: model 'acme/tiny' (use --model DIR|FILE.gguf); "
        "tokenizer 'acme/tiny' (use --model DIR|FILE.gguf, or --tokenizer DIR); dataset 'acme/news' (use "
        "--data-dir DIR with train.jsonl and validation.jsonl)")  # fmt: skip


def test_cached_items_load_offline_after_one_probe(no_hub, tmp_path, monkeypatch):
    """A model, tokenizer and dataset in the cache: no error, offline mode on, a note that says so."""
    import os

    snapshot = tmp_path / "hf-home" / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "tokenizer_config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (tmp_path / "hf-datasets" / "acme___news").mkdir(parents=True)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    config = apply_overrides(Phi2Config(), {"model.model": "acme/tiny", "data.dataset": "acme/news"})
    notes = hub.check_hub_access(config, data=True)
    assert notes == [f"the Hugging Face hub is unreachable ({hub._endpoint()}): working offline from the local cache"]
    assert no_hub.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub.check_hub_access(apply_overrides(config, {"data.data_dir": str(tmp_path)})) == []  # offline from now on: no second probe, no second note


def test_local_paths_need_no_hub(tiny_phi_dir, sample_data_dir, no_hub):
    config = apply_overrides(Phi2Config(), {"model.model": str(tiny_phi_dir), "data.data_dir": str(sample_data_dir)})
    assert hub.hub_items(config, data=True) == []
    assert hub.check_hub_access(config, data=True) == []
    assert no_hub.HF_HUB_OFFLINE is False  # nothing was needed, so nothing was probed or switched
