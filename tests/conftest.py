"""Shared fixtures: offline, CPU-only, every output in tmp_path, tiny random models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PHI2_SHARED_DIR", ROOT.parent / "shared"))
XSUM_DIR = SHARED / "data" / "xsum"
PHI2_TOKENIZER_DIR = SHARED / "models" / "phi-2-tokenizer"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
EXAMPLES_DATA = ROOT / "examples" / "data" / "xsum-sample"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("PHI2_DEBUG", None)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Run every test offline in its own working directory with its own caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("PHI2_DEBUG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def xsum_dir() -> Path:
    if not (XSUM_DIR / "train.jsonl").is_file():
        pytest.skip(f"real XSUM rows not found at {XSUM_DIR} (the shared data folder beside the project)")
    return XSUM_DIR


@pytest.fixture(scope="session")
def phi2_tokenizer_dir() -> Path:
    if not (PHI2_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"phi-2 tokenizer not found at {PHI2_TOKENIZER_DIR} (the shared folder beside the project)")
    return PHI2_TOKENIZER_DIR


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    """The small real XSUM sample shipped in examples/ (always present)."""
    return EXAMPLES_DATA


@pytest.fixture(scope="session")
def tiny_phi_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised Phi model with phi-2's real tokenizer (the try-out's model)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "examples" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("tiny-phi")
    module.main(out)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_phi_dir, sample_data_dir) -> Path:
    """A tiny `phi2 train` run, once per session (2 steps, large LR so the adapter matters)."""
    from typer.testing import CliRunner

    from phi2cli.cli import app

    root = tmp_path_factory.mktemp("phi2-trained-tiny-run")
    here = os.getcwd()
    os.chdir(root)  # the run writes ./phi2-xsum-finetuned and ./phi2-xsum-final here
    try:
        args = ["train", "--data-dir", str(sample_data_dir), "--model", str(tiny_phi_dir), "--samples", "16",
                "--val-samples", "8", "--max-steps", "2", "--eval-every", "2", "--max-length", "256",
                "--warmup-steps", "0", "--lr", "0.01", "--lora-targets", "q_proj,k_proj,v_proj,dense",
                "--lora-r", "16", "--lora-alpha", "32"]  # fmt: skip
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def final(trained, isolated_env) -> Path:
    """The trained adapter copied into this test's working directory as phi2-xsum-final/."""
    return Path(shutil.copytree(trained / "phi2-xsum-final", isolated_env / "phi2-xsum-final"))
