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


def test_llama_cpp_runs_a_phi2_export_like_transformers(final, tiny_phi_dir):
    """phi-2's layout (partial rotary, biases, untied output) as llama.cpp reads it, on the tiny trained run."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp from source)")
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from phi2cli.cli import app

    for kind in ("f16", "q8_0"):
        result = CliRunner().invoke(app, ["export", "--format", "gguf", "--gguf-type", kind, "--output", f"{kind}.gguf"])
        assert result.exit_code == 0, result.output
    base = AutoModelForCausalLM.from_pretrained(tiny_phi_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload().eval()
    ids = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        reference = torch.log_softmax(merged(torch.tensor([ids])).logits[0], -1).numpy()
    top10 = np.argsort(-reference, -1)[:, :10]
    for kind, limit in (("f16", 0.01), ("q8_0", 0.05)):
        llm = llama_cpp.Llama(model_path=f"{kind}.gguf", n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        llm.close()
        log_probs = torch.log_softmax(torch.from_numpy(scores), -1).numpy()
        gap = np.abs(np.take_along_axis(log_probs, top10, -1) - np.take_along_axis(reference, top10, -1))
        assert gap.max() <= limit, (kind, gap.max())
        assert (log_probs.argmax(-1) == reference.argmax(-1)).mean() >= 0.95, kind
