"""Fast greedy decoding and sampling for Phi, Llama/Mistral and Qwen2 models: one prefill, a static
KV cache, a CUDA-graphed step.

Hugging Face generate() grows its cache and runs a Python-heavy forward for every token. Here the
prompts of a batch go through the model once (packed and padding-free on CUDA), their keys and
values land in a preallocated cache, and every next token comes from one fixed-shape step written
from the model's own modules. On CUDA that step is captured once as a CUDA graph and replayed; on
a CPU it runs eagerly, which is how the tests check it token for token against generate().
The cache-filling forward can also run longer inputs that begin with the prompts (the eval-loss
examples, in phi2cli.inference.shared_forward) and cache only their first tokens; the step then feeds the
prompts' remaining tokens as known ones before it decodes.
Sampling (sample_decode, for minimum-Bayes-risk decoding) prefills each prompt once, copies its keys
and values to every sample's cache row, and draws each token inside the graphed step from the row's
own uniform numbers (phi2cli.inference.sampling: the same samples whatever the batch).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phi2cli.inference.decoder_modules import DecoderModules
from phi2cli.inference.sampling import uniform_rows
from phi2cli.kernels.attention import causal_varlen, decode_attention

PREFILL_TOKENS = {"cuda": 32768, "cpu": 4096}  # prompt tokens per prefill forward (bounds activation memory)
MEMORY_SHARE = 0.9  # of the free GPU memory, what the cache and the activations may take
# Decoding steps between looks at whether every row has stopped. Each look waits for the GPU, and a
# batch stops at most this many steps after its last row did. XSUM summaries take ~25 of the 60 new tokens.
STOP_CHECK_EVERY = 8


ROTARY_BY_POSITION = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only (not "dynamic")


def supports(model: Any, longest: int | None = None) -> bool:
    """True for a causal LM of a covered family (phi, llama/mistral, qwen2) made of the plain modules
    the decoder drives; else use generate().

    Args:
        model: the model to decode with.
        longest: the most tokens a sequence will hold (prompt + new tokens); a sliding window is
            accepted only where it covers that many (then it never hides a key).
    """
    from phi2cli.models.families import attention_shape, family_of

    config = getattr(model, "config", None)
    spec = family_of(getattr(config, "model_type", None))
    if spec is None or getattr(model, "model", None) is None:
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ROTARY_BY_POSITION:
        return False
    try:
        shape = attention_shape(config)
        modules = DecoderModules(model)
    except (AttributeError, TypeError, ValueError):
        return False
    if shape.softcap or shape.heads % shape.kv_heads:
        return False
    if shape.sliding_window is not None and (longest is None or longest > shape.sliding_window):
        return False
    if any(type(linear) is not nn.Linear for linear in modules.linears()):  # quantized or adapter-wrapped layers
        return False
    params = list(model.parameters())
    return len({p.device for p in params}) == 1 and len({p.dtype for p in params}) == 1 and \
        params[0].dtype.is_floating_point  # fmt: skip


class StaticDecoder:
    """One batch's preallocated KV cache and its one-token decoding step.

    Row b holds prompt b's keys and values at positions 0..len_b-1; its i-th new token goes to
    len_b + i. `tokens` and `positions` are the step's only inputs, updated in place by it, so
    the step has fixed shapes and no host synchronisation and can be replayed as a CUDA graph.
    With copies > 1, prompt b fills rows b * copies .. b * copies + copies - 1 (one per sample); with
    uniforms [rows, max_new_tokens] (sampling.uniform_rows), new token i of row r is drawn at
    `temperature` with uniforms[r, i] instead of taken greedily.
    """

    def __init__(self, phi: DecoderModules, rows: int, cache_len: int, longest_input: int = 0, copies: int = 1,
                 temperature: float = 0.0, uniforms: torch.Tensor | None = None) -> None:  # fmt: skip
        self.phi, self.rows, self.cache_len = phi, rows, cache_len
        self.copies, self.temperature = copies, temperature
        self.uniforms = None if uniforms is None else uniforms.to(phi.device)
        self.starts = torch.zeros(rows, dtype=torch.long, device=phi.device)  # each row's prompt length
        shape = (rows, phi.kv_heads, cache_len, phi.head_dim)
        # zeros, not empty: a masked slot still enters softmax(.) @ V, and 0 x NaN would be NaN
        self.keys = [torch.zeros(shape, dtype=phi.dtype, device=phi.device) for _ in phi.layers]
        self.values = [torch.zeros(shape, dtype=phi.dtype, device=phi.device) for _ in phi.layers]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=phi.device)  # the token each row feeds next
        self.positions = torch.zeros(rows, dtype=torch.long, device=phi.device)  # where that token goes
        self.columns = torch.arange(cache_len, device=phi.device)
        self.cos, self.sin = phi.rotary_table(max(cache_len, longest_input))  # a forward's input may outrun the cache
        self.packed = _varlen_ready(phi)  # forwards run packed (varlen kernel) or as right-padded rows
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.steps = 0

    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Fill the cache with every prompt's keys and values (in each of its `copies` rows); set up
        the step for the first new token."""
        phi, first_ids = self.phi, []
        for start, group in prefill_groups(prompts, PREFILL_TOKENS[phi.device.type], self.packed):
            lengths = [len(p) for p in group]
            tokens = torch.tensor(list(itertools.chain.from_iterable(group)), dtype=torch.long, device=phi.device)
            last = torch.tensor(list(itertools.accumulate(lengths)), device=phi.device) - 1
            hidden = self.forward(tokens, lengths, start, lengths, last).repeat_interleave(self.copies, dim=0)
            rows = slice(start * self.copies, (start + len(group)) * self.copies)
            uniforms = None if self.uniforms is None else self.uniforms[rows, 0]
            first_ids.append(phi.next_ids(hidden, self.temperature, uniforms))
        self.tokens.copy_(torch.cat(first_ids))
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        self.positions.copy_(lengths.repeat_interleave(self.copies))
        self.starts.copy_(self.positions)

    def forward(self, tokens: torch.Tensor, lengths: Sequence[int], first_row: int, cached: Sequence[int],
                picks: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Whole sequences through the model, caching the keys and values of their first tokens.

        Args:
            tokens: the sequences laid end to end (on the model's device).
            lengths: tokens per sequence; sequence i goes to cache row first_row + i (to rows
                (first_row + i) * copies + c, c < copies, where the decoder holds copies).
            cached: positions 0..cached[i]-1 of sequence i are written to its cache row; the row's
                later slots are left to the steps, which write each before any step reads it.
            picks: indices into `tokens` whose final hidden states are wanted.
        Returns:
            the last layer's hidden states (before the final norm) at `picks`.
        """
        run = self._forward_packed if self.packed else self._forward_padded
        return run(tokens, lengths, first_row, cached, picks.to(self.phi.device))

    def _forward_packed(self, tokens: torch.Tensor, lengths: Sequence[int], first_row: int, cached: Sequence[int],
                        picks: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """All sequences in one row, positions restarting per sequence, varlen flash attention within each."""
        phi, device = self.phi, self.phi.device
        counts = torch.tensor(lengths)
        positions = torch.cat([torch.arange(n) for n in lengths])
        rows = torch.repeat_interleave(torch.arange(first_row, first_row + len(lengths)), counts)
        kept = (positions < torch.repeat_interleave(torch.tensor(cached), counts)).nonzero().squeeze(1)
        slot_rows, slot_positions = rows[kept].to(device), positions[kept].to(device)
        kept = None if len(kept) == len(positions) else kept.to(device)  # None: every token is cached
        positions = positions.to(device)
        bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [tokens, 1, rotary]
        hidden = phi.embed(tokens)  # [tokens, hidden]
        for index, layer in enumerate(phi.layers):
            normed = layer.input_layernorm(hidden)
            query, key, value = phi.qkv(layer, normed, cos, sin)  # [tokens, (kv_)heads, head_dim]
            for copy in range(self.copies):  # a write per copy: no copies-times larger temporary
                self.keys[index][slot_rows * self.copies + copy, :, slot_positions] = key if kept is None else key[kept]
                self.values[index][slot_rows * self.copies + copy, :, slot_positions] = \
                    value if kept is None else value[kept]  # fmt: skip
            attended = causal_varlen(query, key, value, bounds, max(lengths), phi.scaling)
            hidden = phi.finish_layer(layer, hidden, normed, attended.reshape(len(tokens), -1))
        return hidden[picks]

    def _forward_padded(self, tokens: torch.Tensor, lengths: Sequence[int], first_row: int, cached: Sequence[int],
                        picks: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Right-padded rows, plain causal attention (CPU, or no varlen kernel).

        The padding comes after every real token, so the causal mask already hides it from them.
        """
        phi, device = self.phi, self.phi.device
        count, width = len(lengths), max(lengths)
        rows = torch.repeat_interleave(torch.arange(count), torch.tensor(lengths)).to(device)
        columns = torch.cat([torch.arange(n) for n in lengths]).to(device)
        ids = torch.zeros(count, width, dtype=torch.long, device=device)
        ids[rows, columns] = tokens
        written = min(width, max(cached))  # past a row's own cached[i], its steps overwrite what lands here
        cos, sin = self.cos[:width].unsqueeze(1), self.sin[:width].unsqueeze(1)  # [width, 1, rotary]
        hidden = phi.embed(ids)  # [rows, width, hidden]
        for index, layer in enumerate(phi.layers):
            normed = layer.input_layernorm(hidden)
            query, key, value = (t.transpose(1, 2) for t in phi.qkv(layer, normed, cos, sin))  # [rows, heads, w, d]
            for copy in range(self.copies):
                rows_of_copy = slice(first_row * self.copies + copy, (first_row + count) * self.copies, self.copies)
                self.keys[index][rows_of_copy, :, :written] = key[:, :, :written]
                self.values[index][rows_of_copy, :, :written] = value[:, :, :written]
            attended = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=phi.scaling,
                                                      enable_gqa=phi.kv_heads != phi.heads)  # fmt: skip
            hidden = phi.finish_layer(layer, hidden, normed, attended.transpose(1, 2).reshape(count, width, -1))
        return hidden[rows[picks], columns[picks]]

    def force(self, forced: torch.Tensor, cuda_graph: bool) -> None:
        """Feed known tokens [rows, n] one step each from `positions` on (teacher forcing).

        Afterwards `tokens` holds the greedy token after each row's last forced one.
        """
        for column in range(forced.shape[1]):
            self.tokens.copy_(forced[:, column])
            self.advance(cuda_graph)

    def decode(self, max_new_tokens: int, cuda_graph: bool, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """`tokens` and the greedy tokens after it, not yet cut at a stop token: max_new_tokens per row,
        or fewer once every row holds one of `stop_ids` (looked for every STOP_CHECK_EVERY steps)."""
        generated = torch.empty(self.rows, max_new_tokens, dtype=torch.long, device=self.phi.device)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.phi.device) if stop_ids else None
        if max_new_tokens:
            generated[:, 0] = self.tokens
        length = max_new_tokens
        for index in range(1, max_new_tokens):  # finished rows keep going: cheaper than branching; cut on the host
            if stops is not None and index % STOP_CHECK_EVERY == 0 and all_stopped(generated[:, :index], stops):
                length = index
                break
            self.advance(cuda_graph)
            generated[:, index] = self.tokens
        return generated[:, :length].tolist()

    def step(self) -> None:
        """Feed `tokens` at `positions`: write their K/V, attend over the cache, set the next tokens."""
        phi, positions = self.phi, self.positions
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [rows, 1, rotary]
        unwritten = (self.columns[None, :] > positions[:, None])[:, None, None, :]  # [rows, 1, 1, cache_len]
        mask = torch.zeros(unwritten.shape, dtype=phi.dtype, device=phi.device).masked_fill_(unwritten, -torch.inf)
        slot = positions.view(-1, 1, 1, 1).expand(-1, phi.kv_heads, 1, phi.head_dim)
        hidden = phi.embed(self.tokens)  # [rows, hidden]
        for index, layer in enumerate(phi.layers):
            normed = layer.input_layernorm(hidden)
            query, key, value = phi.qkv(layer, normed, cos, sin)  # [rows, (kv_)heads, head_dim]
            keys, values = self.keys[index], self.values[index]
            keys.scatter_(2, slot, key.unsqueeze(2))
            values.scatter_(2, slot, value.unsqueeze(2))
            attended = decode_attention(query.unsqueeze(2), keys, values, mask, phi.scaling)
            hidden = phi.finish_layer(layer, hidden, normed, attended.reshape(self.rows, -1))
        uniforms = None
        if self.uniforms is not None:  # the token after new token i (at starts + i) is new token i + 1
            column = (positions - self.starts + 1).clamp_(0, self.uniforms.shape[1] - 1)
            uniforms = self.uniforms.gather(1, column.unsqueeze(1)).squeeze(1)
        self.tokens.copy_(phi.next_ids(hidden, self.temperature, uniforms))
        self.positions.add_(1)

    def advance(self, cuda_graph: bool) -> None:
        """One step: eager, or (on CUDA) an eager warm-up, then a capture, then graph replays."""
        use_graph = cuda_graph and self.phi.device.type == "cuda"
        if self.graph is not None:
            self.graph.replay()
        elif use_graph and self.steps == 0:
            from phi2cli.kernels.graphs import warm_up

            warm_up(self.step)
        elif use_graph and self.steps == 1 and self.capture():
            self.graph.replay()
        else:
            self.step()
        self.steps += 1

    def capture(self) -> bool:
        """Record step() as a CUDA graph (nothing runs); False, with a warning, where that fails."""
        from phi2cli.kernels.graphs import record_graph

        try:
            graph, _ = record_graph(self.step)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {error}", RuntimeWarning, stacklevel=2)
            return False
        self.graph = graph
        return True


def greedy_decode(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
                  batch_size: int, cuda_graph: bool = True) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of token-id prompts with a static KV cache (see the module docstring).

    Args:
        model: a causal LM for which supports(model) is True, in eval mode.
        prompts: token ids per prompt (at least one each).
        max_new_tokens: most tokens generated per prompt.
        stop_ids: a row ends at the first of these (kept in its output).
        batch_size: most prompts decoded together; on CUDA also capped by free memory.
        cuda_graph: replay the step as a CUDA graph on CUDA (False: run it eagerly).
    Returns:
        the new token ids per prompt, in input order, up to and including the first stop token.
    Raises:
        ValueError for an empty prompt; torch.cuda.OutOfMemoryError when even the batch's cache
        does not fit.
    """
    return [samples[0] for samples in sample_decode(model, prompts, 1, 0.0, max_new_tokens, stop_ids, batch_size,
                                                    cuda_graph=cuda_graph)]  # fmt: skip


def sample_decode(model: Any, prompts: Sequence[Sequence[int]], copies: int, temperature: float,
                  max_new_tokens: int, stop_ids: Sequence[int], batch_size: int, cuda_graph: bool = True,
                  advance: Any = None, seed: int = 0) -> list[list[list[int]]]:  # fmt: skip
    """`copies` continuations of each prompt sampled at `temperature` (0: greedy, one copy is enough);
    as greedy_decode otherwise, with batch_size counting prompts. Sample c of a prompt depends only
    on (seed, the prompt, c) and the model (phi2cli.inference.sampling), not on its batch. `advance`
    is called with the number of prompts done after each batch.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1 or not prompts:
        return [[[] for _ in range(copies)] for _ in prompts]
    phi = DecoderModules(model)
    results: list[list[list[int]]] = [[] for _ in prompts]
    with torch.inference_mode():
        for chunk, cache_len in cache_batches(phi, prompts, max_new_tokens, batch_size, copies, temperature > 0):
            batch = [prompts[i] for i in chunk]
            uniforms = uniform_rows(batch, copies, max_new_tokens, seed) if temperature > 0 else None
            decoder = StaticDecoder(phi, len(chunk) * copies, cache_len, copies=copies, temperature=temperature,
                                    uniforms=uniforms)  # fmt: skip
            decoder.prefill(batch)
            generated = decoder.decode(max_new_tokens, cuda_graph, stop_ids)
            for position, index in enumerate(chunk):
                rows = generated[position * copies : (position + 1) * copies]
                results[index] = [cut_at_stop(row, stop_ids) for row in rows]
            if advance:
                advance(len(chunk))
    return results


def cache_batches(phi: DecoderModules, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
                  copies: int = 1, sampling: bool = False) -> Iterator[tuple[list[int], int]]:  # fmt: skip
    """Prompt indices per batch, longest first (similar lengths share a cache width), with the
    batch's cache length; at most batch_size prompts, and on CUDA what free memory holds for their
    rows (`copies` per prompt; checked when the batch is asked for, after the previous one is done)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    start = 0
    while start < len(order):
        cache_len = len(prompts[order[start]]) + max_new_tokens
        fit = rows_that_fit(phi, cache_len, sampling) // copies
        rows = max(1, min(batch_size, len(order) - start, fit))
        yield order[start : start + rows], cache_len
        start += rows


def all_stopped(generated: torch.Tensor, stops: torch.Tensor) -> bool:
    """Whether every row of `generated` [rows, n] holds a stop token (waits for the GPU)."""
    return bool(torch.isin(generated, stops).any(dim=1).all())


def cut_at_stop(row: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens up to and including the first stop token (all of them if none stops)."""
    stops = set(stop_ids)
    end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
    return list(row[:end])


def rows_that_fit(phi: DecoderModules, cache_len: int, sampling: bool = False) -> int:
    """Rows whose KV cache (and the step's logits; in float32 with their cumulative sum when sampling) fit in
    free GPU memory beside a prefill's activations."""
    if phi.device.type != "cuda":
        return 1 << 30
    free, _ = torch.cuda.mem_get_info(phi.device)
    free += torch.cuda.memory_reserved(phi.device) - torch.cuda.memory_allocated(phi.device)  # cached blocks
    size = torch.finfo(phi.dtype).bits // 8
    hidden, cached = phi.heads * phi.head_dim, phi.kv_heads * phi.head_dim
    per_row = (len(phi.layers) * 2 * cached * cache_len + 2 * phi.vocab) * size + (16 if sampling else 4) * phi.vocab
    prefill = PREFILL_TOKENS["cuda"] * (4 * phi.intermediate + 12 * hidden) * size  # MLP temporaries, q/k/v...
    return int((free * MEMORY_SHARE - prefill) // per_row)


def prefill_groups(prompts: Sequence[Sequence[int]], budget: int,
                   packed: bool) -> list[tuple[int, Sequence[Sequence[int]]]]:  # fmt: skip
    """Consecutive prompts per prefill forward: at most `budget` tokens (padded: rows x longest)."""
    from phi2cli.data.collate import token_groups

    groups = token_groups([len(p) for p in prompts], budget, padded=not packed)
    return [(group.start, prompts[group.start:group.stop]) for group in groups]


def _varlen_ready(phi: DecoderModules) -> bool:
    """True where prefill can run packed: CUDA, half precision, and torch's varlen flash kernel."""
    from phi2cli.kernels.attention import varlen_available

    half = phi.dtype in (torch.float16, torch.bfloat16)
    return phi.device.type == "cuda" and half and varlen_available(phi.head_dim, phi.heads, phi.kv_heads)
