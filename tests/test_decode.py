"""The static-cache greedy decoder: the same tokens as Hugging Face generate(), and when it is used."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PhiConfig, PhiForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from phi2cli.inference import decode
from phi2cli.inference.decode import cut_at_stop, greedy_decode, supports

LENGTHS = (5, 17, 1, 33, 9, 12, 26)  # one batch of unequal prompts, a one-token prompt among them


def tiny_phi(qk_layernorm: bool = False) -> PhiForCausalLM:
    """Phi's architecture (partial rotary, parallel residual, lm_head bias) at toy size, float32, seeded."""
    config = PhiConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        partial_rotary_factor=0.4, hidden_act="gelu_new", max_position_embeddings=256, qk_layernorm=qk_layernorm,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():  # sharp attention, so that a wrong key or position changes the tokens
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0.0, 0.4)
            layer.self_attn.k_proj.weight.normal_(0.0, 0.4)
    return model


def tiny_grouped(kind: str, **changes) -> torch.nn.Module:
    """A Llama, Qwen2 (q/k/v bias) or Mistral at toy size: 4 query heads sharing 2 key/value heads, float32, seeded."""
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
                 eos_token_id=1, pad_token_id=0)  # fmt: skip
    shape.update(changes)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=24, **shape))  # head_dim != hidden / heads (16)
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        model = MistralForCausalLM(MistralConfig(**shape))
    model.eval()
    with torch.no_grad():  # sharp attention, so that a wrong key, head group or position changes the tokens
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0.0, 0.4)
            layer.self_attn.k_proj.weight.normal_(0.0, 0.4)
            if layer.self_attn.k_proj.bias is not None:
                layer.self_attn.k_proj.bias.normal_(0.0, 0.4)
    return model


def random_prompts(lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int] | None = None) -> list[int]:
    """generate() on the prompt alone (no padding): the reference continuation."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=stop_ids, pad_token_id=0)  # fmt: skip
    return cut_at_stop(out[0, len(prompt) :].tolist(), stop_ids or [])


@pytest.fixture(scope="module")
def model() -> PhiForCausalLM:
    return tiny_phi()


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return [hf_greedy(model, prompt, 16) for prompt in random_prompts()]


@pytest.mark.parametrize("batch_size", [len(LENGTHS), 3, 1])
def test_same_tokens_as_hf_generate_for_unequal_prompts(model, reference, batch_size):
    assert len({tuple(r) for r in reference}) == len(reference)  # the rows differ: a real comparison
    assert all(len(set(r)) > 4 for r in reference)  # and are not one token repeated
    assert greedy_decode(model, random_prompts(), 16, [], batch_size=batch_size) == reference


def test_prefill_split_into_several_forwards_gives_the_same_tokens(model, reference, monkeypatch):
    monkeypatch.setitem(decode.PREFILL_TOKENS, "cpu", 40)  # 40 tokens: 1-2 prompts per prefill forward
    assert greedy_decode(model, random_prompts(), 16, [], batch_size=len(LENGTHS)) == reference


def segment_attention(query, key, value, bounds, longest, scale):
    """What the CUDA varlen kernel computes, one packed prompt at a time: causal SDPA within each."""
    pieces = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [(kv_)heads, length, head_dim]
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                    enable_gqa=True)  # fmt: skip
        pieces.append(attended.transpose(0, 1))
    return torch.cat(pieces)


def test_packed_prefill_gives_the_same_tokens(model, reference, monkeypatch):
    """The CUDA prefill (one packed row, positions restarting per prompt), with a CPU stand-in for the kernel."""
    monkeypatch.setattr(decode, "_varlen_ready", lambda phi: True)
    monkeypatch.setattr(decode, "causal_varlen", segment_attention)
    monkeypatch.setitem(decode.PREFILL_TOKENS, "cpu", 50)  # several packed forwards per batch
    assert greedy_decode(model, random_prompts(), 16, [], batch_size=5) == reference


def test_query_key_layernorm_variant_matches_too():
    model = tiny_phi(qk_layernorm=True)
    prompts = random_prompts((4, 11, 7), seed=3)
    assert greedy_decode(model, prompts, 10, [], batch_size=2) == [hf_greedy(model, p, 10) for p in prompts]


def test_rows_end_at_their_first_stop_token(model, reference):
    stop_ids = [reference[0][3], reference[3][6]]  # the 4th token of row 0, the 7th of row 3
    fast = greedy_decode(model, random_prompts(), 16, stop_ids, batch_size=4)
    assert fast == [hf_greedy(model, p, 16, stop_ids) for p in random_prompts()]
    assert fast[0] == reference[0][: reference[0].index(stop_ids[0]) + 1] and len(fast[0]) <= 4
    assert fast[3][-1] in stop_ids and len(fast[3]) <= 7
    assert any(len(row) == 16 for row in fast)  # a row that never stops keeps all its tokens


def test_a_batch_stops_decoding_once_every_row_has_stopped(model, reference, monkeypatch):
    """No step is spent after the check that finds every row stopped, and the tokens stay generate()'s."""
    stop_ids = sorted({row[2] for row in reference})  # every row stops by its third new token
    steps = []
    advance = decode.StaticDecoder.advance
    monkeypatch.setattr(decode.StaticDecoder, "advance", lambda self, graph: steps.append(1) or advance(self, graph))
    monkeypatch.setattr(decode, "STOP_CHECK_EVERY", 4)
    fast = greedy_decode(model, random_prompts(), 16, stop_ids, batch_size=len(LENGTHS))
    assert fast == [hf_greedy(model, p, 16, stop_ids) for p in random_prompts()]
    assert all(len(row) <= 3 for row in fast)
    assert len(steps) == 3  # new tokens 2-4 come from steps (the 1st from the prefill); the look at 4 ends it
    steps.clear()
    greedy_decode(model, random_prompts(), 16, [], batch_size=len(LENGTHS))
    assert len(steps) == 15  # without stop tokens every step runs


def test_edge_cases(model):
    prompts = random_prompts((3, 8))
    assert greedy_decode(model, prompts, 1, [], batch_size=2) == [hf_greedy(model, p, 1) for p in prompts]
    assert greedy_decode(model, prompts, 0, [], batch_size=2) == [[], []]
    assert greedy_decode(model, [], 5, [], batch_size=2) == []
    with pytest.raises(ValueError, match="at least one token"):
        greedy_decode(model, [[5], []], 5, [], batch_size=2)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def grouped(request):
    """(model, generate()'s continuations of random_prompts()) for a grouped-head family."""
    model = tiny_grouped(request.param)
    return model, [hf_greedy(model, prompt, 12) for prompt in random_prompts()]


@pytest.mark.parametrize("prefill", ["padded", "packed"])
def test_grouped_head_families_give_the_same_tokens_as_hf_generate(grouped, prefill, monkeypatch):
    """Llama (head_dim 24 != hidden / heads) and Qwen2 (q/k/v bias): sequential residual, full rotary, GQA."""
    model, reference = grouped
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert len({tuple(r) for r in reference}) == len(reference) and all(len(set(r)) > 4 for r in reference)
    if prefill == "packed":
        monkeypatch.setattr(decode, "_varlen_ready", lambda phi: True)
        monkeypatch.setattr(decode, "causal_varlen", segment_attention)
    monkeypatch.setitem(decode.PREFILL_TOKENS, "cpu", 50)  # several prefill forwards per batch
    assert greedy_decode(model, random_prompts(), 12, [], batch_size=5) == reference
    if prefill == "padded":
        assert greedy_decode(model, random_prompts(), 12, [], batch_size=1) == reference


def test_mistral_decodes_where_its_window_covers_every_sequence():
    model = tiny_grouped("mistral", sliding_window=64)
    prompts = random_prompts((4, 30, 9), seed=5)
    assert not supports(model) and not supports(model, longest=65)  # the window could hide keys
    assert supports(model, longest=64)
    assert greedy_decode(model, prompts, 10, [], batch_size=2) == [hf_greedy(model, p, 10) for p in prompts]


def test_supports_plain_models_of_covered_families(model):
    from peft import LoraConfig, get_peft_model

    assert supports(model) and supports(tiny_grouped("llama")) and supports(tiny_grouped("qwen2"))
    assert supports(tiny_grouped("qwen2", use_sliding_window=False, sliding_window=16), longest=200)  # unused window
    assert supports(tiny_grouped("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    # dynamic scaling changes with the longest position seen: one table for the whole cache would differ
    assert not supports(tiny_grouped("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 1e4}))  # fmt: skip
    assert not supports(get_peft_model(tiny_grouped("llama"), LoraConfig(r=2, target_modules=["o_proj"])))
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    with_adapter = get_peft_model(tiny_phi(), LoraConfig(r=2, target_modules=["q_proj"]))  # unmerged LoRA layers
    assert not supports(with_adapter)
    assert supports(with_adapter.merge_and_unload())


class Calls:
    """Counts calls of the fast decoder and of Hugging Face generate() while delegating to them."""

    def __init__(self, monkeypatch, loaded):
        self.fast = self.hf = 0
        real_decode, real_generate = decode.greedy_decode, loaded.model.generate

        def fast(*args, **kwargs):
            self.fast += 1
            return real_decode(*args, **kwargs)

        def hf(*args, **kwargs):
            self.hf += 1
            return real_generate(*args, **kwargs)

        monkeypatch.setattr(decode, "greedy_decode", fast)
        monkeypatch.setattr(loaded.model, "generate", hf)


@pytest.fixture(scope="module")
def loaded(tiny_phi_dir):
    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.inference.trained_model import load_model

    return load_model(apply_overrides(Phi2Config(), {"model.model": str(tiny_phi_dir)}).validate())


@pytest.fixture(scope="module")
def documents(sample_data_dir) -> list[str]:
    rows = [json.loads(line) for line in (sample_data_dir / "validation.jsonl").read_text().splitlines()[:5]]
    documents = [r["document"] for r in rows]
    documents[1] = documents[1][:150]  # a short article among long ones
    return documents


def test_generate_routes_greedy_phi_to_the_fast_decoder_with_the_same_summaries(loaded, documents, monkeypatch):
    from phi2cli.inference import generate as inference
    from phi2cli.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=8)
    calls = Calls(monkeypatch, loaded)
    fast = inference.generate(loaded, documents, gen, batch_size=2)
    assert (calls.fast, calls.hf) == (3, 0)  # 5 articles in batches of 2
    monkeypatch.setattr(inference, "uses_fast_decoder", lambda *args, **kwargs: False)
    slow = inference.generate(loaded, documents, gen, batch_size=2)
    assert (calls.fast, calls.hf) == (3, 3)
    assert fast == slow  # text, prompt tokens, new tokens and truncation, in input order
    assert fast[1].prompt_tokens < fast[0].prompt_tokens and all(g.new_tokens == 8 for g in fast)


def test_generate_keeps_hf_generate_for_beams_sampling_and_streaming(loaded, documents, monkeypatch):
    from phi2cli.config import GenerationConfig
    from phi2cli.inference.generate import generate

    calls = Calls(monkeypatch, loaded)
    generate(loaded, documents[:2], GenerationConfig(max_new_tokens=4, num_beams=2), batch_size=2)
    generate(loaded, documents[:2], GenerationConfig(max_new_tokens=4, do_sample=True), batch_size=2)
    stream = io.StringIO()
    streamed = generate(loaded, documents[:1], GenerationConfig(max_new_tokens=4), batch_size=1, stream=stream)
    assert (calls.fast, calls.hf) == (0, 3)
    assert stream.getvalue().strip() == streamed[0].text


def test_default_gpu_batch_is_larger_only_where_the_fast_decoder_runs(loaded, monkeypatch):
    from dataclasses import replace

    from phi2cli.inference import generate as inference
    from phi2cli.config import GenerationConfig

    on_gpu = replace(loaded, device="cuda")  # only the batch-size choice looks at the device
    assert inference.default_batch_size(on_gpu, None, GenerationConfig()) == inference.FAST_CUDA_GEN_BATCH
    assert inference.default_batch_size(on_gpu, None, GenerationConfig(do_sample=True)) == inference.CUDA_GEN_BATCH
    # beam search keeps num_beams sequences per article: fewer articles per batch
    assert inference.default_batch_size(on_gpu, None, GenerationConfig(num_beams=4)) == inference.CUDA_GEN_BATCH // 4
    assert inference.default_batch_size(on_gpu, None, GenerationConfig(no_repeat_ngram_size=3)) == \
        inference.CUDA_GEN_BATCH  # greedy through generate()
    assert inference.default_batch_size(on_gpu, 7, GenerationConfig()) == 7
    assert inference.default_batch_size(loaded, None, GenerationConfig()) == loaded.config.generation.batch_size


def test_mbr_summaries_are_the_same_through_both_decoders_and_reach_the_stream(loaded, documents, monkeypatch):
    from phi2cli.config import GenerationConfig
    from phi2cli.inference import generate as inference

    gen = GenerationConfig(max_new_tokens=6, mbr_samples=4, mbr_temperature=1.0)
    calls = Calls(monkeypatch, loaded)
    fast = inference.generate(loaded, documents, gen, batch_size=2)
    assert calls.hf == 0 and all(g.sampled_tokens > 0 for g in fast)
    stream = io.StringIO()
    alone = inference.generate(loaded, documents[3:4], gen, batch_size=1, stream=stream)
    assert alone == fast[3:4]  # an article's samples do not depend on its batch
    assert stream.getvalue() == fast[3].text + "\n"  # shown once picked
    monkeypatch.setattr(inference, "uses_fast_decoder", lambda *args, **kwargs: False)
    slow = inference.generate(loaded, documents, gen, batch_size=2)
    assert calls.hf > 0 and slow == fast
