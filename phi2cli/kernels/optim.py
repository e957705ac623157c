"""bitsandbytes' 8-bit AdamW over one flat buffer instead of one tensor at a time.

bitsandbytes updates each parameter with its own kernel and synchronises the GPU after every
one: with LoRA's 256 small matrices on phi-2 that is 256 launches and 256 host-GPU round trips
per optimizer step. Here the trainable parameters of a group live, for the optimizer, in one
flat fp32 buffer, each tensor starting on a 256-element boundary (the 8-bit state's block size),
so every quantization block holds elements of one tensor only, exactly as it would per tensor:
the update is the same, element for element. Per step: one copy of the gradients in, one update
kernel, one copy of the new values out, and no synchronisation. The parameters' values are copied
in at each step too, so the parameters stay the truth (a checkpoint loaded into them is what is
updated next).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from phi2cli.compat import bnb_step_parts_present, foreach_copy

BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: one absmax per 256 elements


def _padded(numel: int) -> int:
    return math.ceil(numel / BLOCK) * BLOCK


class FlatAdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise states (bitsandbytes), run over flat per-group buffers.

    param_groups are the model's own tensors (the LR scheduler, gradient clipping and the
    Trainer see them as usual); the bitsandbytes optimizer inside sees one flat tensor per group.
    state_dict() is that inner optimizer's, so checkpoints resume with this class.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096) -> None:  # fmt: skip
        import bitsandbytes as bnb

        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._slots: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]] = []  # group, values, grads
        inner_groups = []
        for group in self.param_groups:
            tensors = group["params"]
            if not tensors:
                continue
            if len({(p.dtype, p.device) for p in tensors}) != 1 or tensors[0].dtype != torch.float32:
                raise ValueError("FlatAdamW8bit needs fp32 parameters on one device")
            offsets = [0]
            for p in tensors:
                offsets.append(offsets[-1] + _padded(p.numel()))
            flat = torch.nn.Parameter(torch.zeros(offsets[-1], dtype=torch.float32, device=tensors[0].device))
            flat.grad = torch.zeros_like(flat)
            values = [flat.data[a:a + p.numel()].view_as(p) for a, p in zip(offsets, tensors)]
            grads = [flat.grad[a:a + p.numel()].view_as(p) for a, p in zip(offsets, tensors)]
            inner_group = {k: v for k, v in group.items() if k != "params"}
            inner_groups.append({**inner_group, "params": [flat]})
            self._slots.append((group, values, grads))
        self.inner = bnb.optim.AdamW(inner_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     optim_bits=8, min_8bit_size=min_8bit_size, is_paged=False)  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        for group, values, grads in self._slots:
            tensors = group["params"]
            incoming = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
            foreach_copy(grads, incoming)
            # the values too: the parameters may have been set since the last step (a checkpoint loaded)
            foreach_copy(values, tensors)
        self._update()
        for group, values, grads in self._slots:
            foreach_copy(group["params"], values)
        return loss

    def _update(self) -> None:
        """bitsandbytes' step without its per-tensor GPU synchronisation (one tensor per group here)."""
        inner = self.inner
        if not bnb_step_parts_present(inner):
            inner.step()  # another bitsandbytes: its own step, synchronising
            return
        if not inner.initialized:
            inner.check_overrides()
            inner.to_gpu()
            inner.initialized = True
        for gindex, group in enumerate(inner.param_groups):
            for pindex, flat in enumerate(group["params"]):
                if not inner.state[flat]:
                    inner.init_state(group, flat, gindex, pindex)
                inner.update_step(group, flat, gindex, pindex)

    def _sync_hyperparameters(self, into_inner: bool = True) -> None:
        """The LR scheduler writes the outer groups; the inner optimizer (and its state_dict) reads them.
        into_inner=False copies the other way, after a checkpoint was loaded into the inner one."""
        for inner_group, (group, *_) in zip(self.inner.param_groups, self._slots):
            source, target = (group, inner_group) if into_inner else (inner_group, group)
            target.update({key: value for key, value in source.items() if key != "params"})

    def state_dict(self) -> dict[str, Any]:
        self._sync_hyperparameters()  # save the learning rate the next step would use, not the last one
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._sync_hyperparameters(into_inner=False)


def flatten_bnb_adamw(optimizer: Any) -> Any:
    """The FlatAdamW8bit equivalent of a bitsandbytes 8-bit AdamW (paged or not); else `optimizer`.

    Paging only moves optimizer state to host memory under pressure; LoRA's state is tens of
    megabytes, so the flat optimizer keeps it on the GPU. Tensors below bitsandbytes'
    min_8bit_size (which it updates with 32-bit state) keep the original optimizer.
    """
    args = getattr(optimizer, "args", None)
    name = type(optimizer).__name__
    if args is None or getattr(args, "optim_bits", None) != 8 or name not in ("AdamW", "AdamW8bit", "PagedAdamW8bit"):
        return optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or any(p.dtype != torch.float32 for p in params) or len({p.device for p in params}) != 1:
        return optimizer
    if any(p.numel() < args.min_8bit_size for p in params):
        return optimizer  # bitsandbytes keeps these small tensors' state in 32 bits: leave it be
    groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
    first = groups[0]
    return FlatAdamW8bit(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"],
                         weight_decay=first["weight_decay"], min_8bit_size=args.min_8bit_size)
