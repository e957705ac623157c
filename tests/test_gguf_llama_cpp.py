"""An independent reader: llama.cpp (llama-cpp-python) runs the exported GGUF of a fine-tuned SmolLM2
and agrees with transformers on the merged model (benchmarks/gguf_agreement.py, a few minutes on CPU)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT, SMOLLM2_GGUF

pytestmark = pytest.mark.slow


def test_llama_cpp_matches_transformers_on_exported_smollm2(xsum_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp from source)")
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}")
    spec = importlib.util.spec_from_file_location("gguf_agreement", ROOT / "benchmarks" / "gguf_agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)

    report = agreement.main(["--model", str(SMOLLM2_GGUF), "--data-dir", str(xsum_dir), "--run-dir",
                             str(tmp_path / "run"), "--steps", "4", "--samples", "32"])  # fmt: skip
    assert len(report["prompts"]) == 3
    assert report["f16_max_top10_logprob_diff"] <= 0.05, report
    assert report["q8_0_top1_same_continuation"] >= 0.95, report
    assert all(p["tokenizer_same"] for p in report["prompts"]), report
    assert all(p["phi2_summarize"] and p["llama_cpp_f16_summary"] for p in report["prompts"]), report
