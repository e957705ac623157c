"""The model a run trains, built from the plan and the model's family, with a record of its fast paths."""

from __future__ import annotations

import dataclasses
from typing import Any

from phi2cli.config import Phi2Config
from phi2cli.training.plan import EnginePlan


def build_model(config: Phi2Config, plan: EnginePlan, precision: Any, paths: Any = None) -> Any:
    """Base model (4-bit NF4 by default) + LoRA, laid out as the plan says; `paths` records each fast path."""
    from phi2cli.kernels import attention
    from phi2cli.kernels.fast_paths import FastPaths
    from phi2cli.models.families import attention_shape, family_of, varlen_refusal
    from phi2cli.models.dequantized import load_dequantized_base
    from phi2cli.models.loading import attach_lora, load_base_model

    paths = paths if paths is not None else FastPaths()
    if plan.dequantize_base:
        model = load_dequantized_base(config.model, precision, for_training=True)
        for param in model.parameters():
            param.requires_grad_(False)
        paths.active("dequantized_base")
    else:
        model = load_base_model(config.model, precision, for_training=True)
    spec = family_of(getattr(model.config, "model_type", None))
    if plan.packed:
        shape = attention_shape(model.config)
        refusal = varlen_refusal(shape) if spec else "not one of the engine's families"
        if refusal is None and attention.register(shape.head_dim, shape.heads, shape.kv_heads, shape.sliding_window):
            model.set_attn_implementation(attention.NAME)
            paths.active("varlen_attention", f"{shape.heads} heads, {shape.kv_heads} key/value heads, "
                                             f"head_dim {shape.head_dim}")  # fmt: skip
        elif precision.device == "cuda":
            paths.fell_back("varlen_attention", refusal or "torch's varlen flash kernel does not run here "
                            "for this attention shape; packed rows use SDPA")  # fmt: skip
        else:
            paths.off("varlen_attention", "no CUDA GPU (packed rows use SDPA)")
    from transformers import set_seed

    set_seed(config.train.seed)  # LoRA's initial A matrices come from the global RNG
    model = attach_lora(model, config.lora, plan.gradient_checkpointing, lean=plan.profile == "memory-saver",
                        upcast_norms=plan.autocast)  # fmt: skip
    if plan.fused_kernels:
        from phi2cli.kernels import lora as lora_fast

        patched = lora_fast.install(model)
        paths.active("lean_lora", f"{patched} layers") if patched else \
            paths.fell_back("lean_lora", "no plain LoRA linear layer (PEFT's forward runs)")  # fmt: skip
        if lora_fast.fuse_gelu(model):
            paths.active("tanh_gelu")
    if plan.torch_nf4:
        from phi2cli.kernels.nf4 import swap_linear4bit

        swapped = swap_linear4bit(model)
        paths.active("torch_nf4", f"{swapped} layers") if swapped else \
            paths.fell_back("torch_nf4", "no NF4 4-bit linear layer (bitsandbytes' layers run)")  # fmt: skip
    if plan.compile:
        from phi2cli.kernels.compiled import compile_layers, describe

        def compile_failed(error: BaseException) -> None:
            paths.fell_back("compile", f"{describe(error)}; the decoder layers run eagerly")

        if spec and compile_layers(model, spec.layer_classes, compile_failed):
            paths.active("compile")
        else:
            paths.fell_back("compile", "no decoder layer of a known family to compile")
    return model


def with_adapted_targets(config: Phi2Config, model: Any) -> Phi2Config:
    """The config with the LoRA targets that were adapted (the family's defaults when none were given)."""
    if config.lora.targets:
        return config
    peft_config = next(iter(getattr(model, "peft_config", {}).values()), None)
    targets = getattr(peft_config, "target_modules", None)
    if not targets:
        return config
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets, key=_target_order))
    return dataclasses.replace(config, lora=dataclasses.replace(config.lora, targets=targets))


def _target_order(name: str) -> tuple[int, str]:
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "dense")
    return (order.index(name) if name in order else len(order), name)


def record_trainer_paths(paths: Any, plan: EnginePlan, trainer: Any) -> None:
    """The fast paths the Trainer owns (flat optimizer, CUDA graphs), then the plan's unused ones as off."""
    if plan.flat_optimizer:
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
        if type(optimizer).__name__ == "FlatAdamW8bit":
            paths.active("flat_optimizer")
        else:
            paths.fell_back("flat_optimizer", f"the optimizer ({type(optimizer).__name__}) is not one "
                                              f"FlatAdamW8bit can replace; it ran per tensor")  # fmt: skip
    if plan.cuda_graphs:
        if trainer.graph_note:
            paths.fell_back("cuda_graphs", trainer.graph_note)
        elif trainer.graphed is not None:
            paths.active("cuda_graphs")
        else:
            paths.fell_back("cuda_graphs", "no training step was recorded (no CUDA, or not the selective-head loss)")
    record_plan_paths(paths, plan)


def family_plan(plan: EnginePlan, model_type: str | None) -> tuple[EnginePlan, str | None]:
    """The plan for this model's family: an unknown family runs the plain Hugging Face path."""
    from phi2cli.models.families import family_of, unknown_family_note

    spec = family_of(model_type)
    if spec is not None or plan.profile == "reference":
        return plan, None
    plain = dataclasses.replace(plan, compile=False, cuda_graphs=False, fused_kernels=False,
                                flat_optimizer=False)  # fmt: skip
    return plain, unknown_family_note(model_type)


def record_plan_paths(paths: Any, plan: EnginePlan) -> None:
    """The fast paths the plan does not ask for, as off (with the profile as the reason)."""
    for name, wanted in (("dequantized_base", plan.dequantize_base), ("varlen_attention", plan.packed),
                         ("lean_lora", plan.fused_kernels), ("torch_nf4", plan.torch_nf4),
                         ("compile", plan.compile), ("flat_optimizer", plan.flat_optimizer),
                         ("cuda_graphs", plan.cuda_graphs)):  # fmt: skip
        if not wanted:
            paths.off(name, f"not used by this run's plan ({plan.profile} profile on this machine)")
