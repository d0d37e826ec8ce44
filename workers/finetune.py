"""Fine-tune modes: which parameters of a loaded, pruned model train (`spec.finetune`).

`apply_finetune` runs after loading and before the optimiser is built; the optimiser then
receives only the parameters left trainable (`trainable_parameters`), and restart checkpoints
and best-epoch copies hold only those (`trainable_state`, `load_trainable`): the frozen rest is
rebuilt from the model source, which is deterministic under the trial's seed.

Tied LM heads (GPT-2, OPT, SmolLM2 share the output matrix with the input embeddings): in the
modes that train the head but not the body (head-only, last-N) the head is untied first, given
its own copy of the matrix, and only that copy trains. Training the shared matrix would also
move the input embeddings, so "head only" would change what every frozen layer sees, and the
backward pass would run through the whole frozen body to reach them. `n_params` of a trial
stays the pruned model's size (the untied copy and LoRA adapters are not counted);
`n_trainable_params` counts what the optimiser updates, the untied copy included.

LoRA goes through `peft`: `get_peft_model` injects the adapters into the model in place and we
keep training the (now adapted) transformers model itself, so every family path and head
works unchanged. A classifier head (`score`, new and random) trains too, through peft's
`modules_to_save`; the LM head of prompt-lm stays frozen (only adapters train). QLoRA is the
same over decoder-layer linear weights stored in 4-bit NF4 (bitsandbytes); it is accepted on
CUDA only (`check_device`, before any model loads): bitsandbytes' CPU kernels are a slow
fallback, kept for the tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from slimsweep.workers.families import Family, family_of, head_module
from slimsweep.workers.spec import SpecError, TrialSpec
from slimsweep.workers.tables import FINETUNES
from torch import nn

CLASSIFIER_HEADS = ("prompt-cls", "vanilla-cls")  # heads whose output layer is a new `score`


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _train(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)


def _untie_head(model: nn.Module, head: str, fam: Family) -> None:
    """Give a tied LM head its own copy of the embedding matrix (see the module docstring)."""
    out = head_module(model, head)
    if out.weight is fam.get(model, "embeddings").weight:
        out.weight = nn.Parameter(out.weight.detach().clone())
        model.config.tie_word_embeddings = False  # a later tie_weights() must not re-tie


def _full(spec: TrialSpec, model: nn.Module, fam: Family) -> nn.Module:
    return model


def _head_only(spec: TrialSpec, model: nn.Module, fam: Family) -> nn.Module:
    _freeze(model)
    _untie_head(model, spec.head, fam)
    _train(head_module(model, spec.head))
    return model


def _last_n(spec: TrialSpec, model: nn.Module, fam: Family) -> nn.Module:
    layers = fam.get(model, "layers")
    n = spec.finetune.last_n
    if not 1 <= n <= len(layers):  # the spec check catches it before loading; kept as a guard
        raise SpecError(
            f"trial {spec.trial_id}: finetune last-{n} but the model has {len(layers)} "
            f"layers; use last-1..last-{len(layers)}, or keep more layers"
        )
    _freeze(model)
    _untie_head(model, spec.head, fam)
    for part in (*layers[-n:], fam.get(model, "final_norm"), head_module(model, spec.head)):
        _train(part)
    return model


def lora_targets(spec: TrialSpec, fam: Family) -> tuple[str, ...]:
    """The module names LoRA adapts: the grid's, else the family's default."""
    return spec.finetune.lora_targets or fam.lora_targets


def _lora(spec: TrialSpec, model: nn.Module, fam: Family) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    ft = spec.finetune
    targets = lora_targets(spec, fam)
    # GPT-2 stores its projections transposed (Conv1D); peft must be told, or it warns and
    # guesses.
    transposed = any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, m in model.named_modules()
    )
    config = LoraConfig(
        r=ft.lora_r,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=transposed,
        modules_to_save=["score"] if spec.head in CLASSIFIER_HEADS else None,
    )
    try:
        with warnings.catch_warnings():
            # transformers deprecates an attribute peft reads; nothing for a user to act on
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config).get_base_model()
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        leaves = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
        )
        raise SpecError(
            f"trial {spec.trial_id}: finetune {ft.label}: no module named "
            f"{', '.join(targets)} in this {fam.name} model; set lora targets to some of "
            f"{', '.join(leaves)}"
        ) from None


def _qlora(spec: TrialSpec, model: nn.Module, fam: Family) -> nn.Module:
    """LoRA (as `_lora`) over a frozen base whose decoder layers' `nn.Linear` weights are
    stored in 4-bit NF4 by bitsandbytes and computed in bf16 (QLoRA). The weights are
    quantised when the model moves to its device; embeddings, norms and the head stay float."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SpecError(
            f"trial {spec.trial_id}: finetune {spec.finetune.label} needs bitsandbytes; "
            f"install it with: pip install 'slimsweep[qlora]'"
        ) from None
    n = 0
    for layer in fam.get(model, "layers"):
        for name, child in list(layer.named_modules()):
            if type(child) is not nn.Linear:
                continue
            parent, _, attr = name.rpartition(".")
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            q.bias = child.bias
            setattr(layer.get_submodule(parent), attr, q)
            n += 1
    if n == 0:
        raise SpecError(
            f"trial {spec.trial_id}: finetune {spec.finetune.label}: the {fam.name} layers have "
            f"no nn.Linear weights to quantise (GPT-2's are Conv1D); use lora"
        )
    model.is_loaded_in_4bit = True  # peft reads it to put its 4-bit LoRA layers on Linear4bit
    return _lora(spec, model, fam)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


# FinetuneSpec.mode -> what it does to the model (the facts of each mode: tables.FINETUNES).
APPLY: dict[str, Callable[[TrialSpec, nn.Module, Family], nn.Module]] = {
    "full": _full,
    "head-only": _head_only,
    "last-n": _last_n,
    "lora": _lora,
    "qlora": _qlora,
}


def check_device(spec: TrialSpec, device: torch.device) -> None:
    """SpecError when the mode cannot run on `device` (raised before any model loads)."""
    mode = FINETUNES[spec.finetune.mode]
    if mode.needs_cuda and device.type != "cuda":
        raise SpecError(
            f"trial {spec.trial_id}: finetune {spec.finetune.label} needs a CUDA GPU "
            f"(bitsandbytes 4-bit kernels) but runs on {device.type}; use lora on a CPU, "
            f"or run on a GPU"
        )


def apply_finetune(spec: TrialSpec, model: nn.Module) -> nn.Module:
    """The model with only the parameters `spec.finetune` names left trainable (LoRA: with
    adapters added). Returns the model to train, which for every mode is a transformers model
    with the family's layout."""
    return APPLY[spec.finetune.mode](spec, model, family_of(model.config.model_type))


# --- what trains, as the optimiser and the checkpoints see it -----------------------------


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached contiguous CPU copies (`named_parameters`
    yields a tied weight once)."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def merge_adapters(model: nn.Module) -> nn.Module:
    """The model with its LoRA adapters folded into the weights they adapt and peft's wrappers
    replaced by the plain modules (a classifier kept by `modules_to_save`: its trained copy),
    so `save_pretrained` writes a standard transformers model; a model without adapters is
    returned as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            plain = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            plain = module.unload_and_optionally_merge_module(
                merge=True, safe_merge=False, adapter_names=None
            )
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
    return model


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state` of the same spec) into the model's trainable
    parameters; the names must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        odd = sorted(set(params) ^ set(state))
        raise ValueError(
            f"checkpoint does not match the trainable parameters ({', '.join(odd[:3])} ...); "
            "was it written for another finetune mode?"
        )
    for name, p in params.items():
        p.copy_(state[name])
