"""Fine-tune modes: each changes exactly the parameters it names (counted, the rest
bit-identical) for every family and head; LoRA through peft; the untied head of head-only;
trainable-only optimiser and checkpoints; a restart in a non-full mode; QLoRA refused on CPU;
the spec checks and labels."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from slimsweep.workers import train as train_mod
from slimsweep.workers.families import load_model
from slimsweep.workers.finetune import apply_finetune, trainable_parameters
from slimsweep.workers.run import run_trial
from slimsweep.workers.spec import (
    DataSpec,
    FinetuneSpec,
    ModelSpec,
    RuntimeSpec,
    SpecError,
    TrainSpec,
    TrialSpec,
    check_finetune,
)
from slimsweep.workers.tasks import TASKS

CPU = torch.device("cpu")
HEADS = ("prompt-lm", "prompt-cls", "vanilla-cls")
FAMILIES = ("gpt2", "opt", "llama")
TEXTS = ("a great film", "an awful day", "the great story", "awful song")
# The conftest's tiny models keep 4 layers; tensors per decoder layer (weights and biases):
# GPT-2 ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj (w+b each) = 12; OPT q, k, v, out_proj,
# two norms, fc1, fc2 (w+b each) = 16; Llama q, k, v, o, gate, up, down, two norms = 9.
LAYER_TENSORS = {"gpt2": 12, "opt": 16, "llama": 9}
FINAL_NORM_TENSORS = {"gpt2": 2, "opt": 2, "llama": 1}
LORA_TARGET_COUNT = {"gpt2": 1, "opt": 2, "llama": 2}  # c_attn | q_proj, v_proj
LAYER_PREFIX = {"gpt2": "transformer.h.", "opt": "model.decoder.layers.", "llama": "model.layers."}


class Ex:
    def __init__(self, ids: list[int], label: int):
        self.input_ids = tuple(ids)
        self.query_ids = tuple(ids)
        self.label = label


def make_spec(folder: Path, head: str, finetune: FinetuneSpec, **train) -> TrialSpec:
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source=str(folder)),
        layers=4,
        task=TASKS["sst2"],
        head=head,
        seed=3,
        finetune=finetune,
        data=DataSpec(train_size=8, valid_size=6, test_size=6),
        train=TrainSpec(**{"lr": 1e-2, "epochs": 3, "patience": 3, **train}),
        runtime=RuntimeSpec(device="cpu", checkpoint_min_s=0),
    )


def loaded(spec: TrialSpec):
    train_mod.seed_everything(spec.seed, CPU)
    out = load_model(spec)
    return out, apply_finetune(spec, out.model)


def two_steps(spec: TrialSpec, model, tokenizer) -> None:
    """Two optimiser steps (LoRA's B starts at zero, so A moves only from the second)."""
    examples = [Ex(tokenizer.encode(t), i % 2) for i, t in enumerate(TEXTS)]
    label_ids = torch.tensor([tokenizer.encode(w)[0] for w in spec.task.label_words])
    optimizer = train_mod.make_optimizer(spec, model)
    model.train()
    for _ in range(2):
        train_mod.train_step(
            spec, model, examples, label_ids, optimizer, tokenizer.pad_token_id, CPU
        )


def changed_after_two_steps(spec: TrialSpec) -> tuple[set[str], set[str], object]:
    """(names of the parameters that changed, names of the trainable ones, the model)."""
    out, model = loaded(spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    two_steps(spec, model, out.tokenizer)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return changed, trainable, model


def head_name(head: str) -> str:
    return "lm_head.weight" if head == "prompt-lm" else "score.weight"


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_changes_every_parameter(tiny_models, family: str, head: str) -> None:
    spec = make_spec(tiny_models[family], head, FinetuneSpec())
    changed, trainable, model = changed_after_two_steps(spec)
    assert changed == trainable == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_head_only_changes_the_head_alone(tiny_models, family: str, head: str) -> None:
    spec = make_spec(tiny_models[family], head, FinetuneSpec(mode="head-only"))
    changed, trainable, _ = changed_after_two_steps(spec)
    assert changed == trainable == {head_name(head)}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_last_n_changes_the_last_layers_final_norm_and_head(
    tiny_models, family: str, head: str
) -> None:
    spec = make_spec(tiny_models[family], head, FinetuneSpec(mode="last-n", last_n=2))
    changed, trainable, _ = changed_after_two_steps(spec)
    assert changed == trainable
    expected = 2 * LAYER_TENSORS[family] + FINAL_NORM_TENSORS[family] + 1
    assert len(changed) == expected
    in_layers = {n for n in changed if n.startswith(LAYER_PREFIX[family])}
    assert {n[len(LAYER_PREFIX[family])] for n in in_layers} == {"2", "3"}  # of 0..3
    assert head_name(head) in changed


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_the_adapters_and_the_classifier_only(
    tiny_models, family: str, head: str
) -> None:
    from peft.tuners.lora import LoraLayer

    spec = make_spec(tiny_models[family], head, FinetuneSpec(mode="lora"))
    changed, trainable, model = changed_after_two_steps(spec)
    assert changed == trainable
    adapters = {n for n in changed if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 4 * LORA_TARGET_COUNT[family] * 2  # 4 layers x targets x (A, B)
    # the classification heads' new score trains (peft modules_to_save); the LM head does not
    assert changed - adapters == (
        set() if head == "prompt-lm" else {"score.modules_to_save.default.weight"}
    )
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 4 * LORA_TARGET_COUNT[family]


def test_lora_starts_as_the_base_model_and_counts_its_adapters(tiny_models) -> None:
    spec = make_spec(tiny_models["llama"], "prompt-lm", FinetuneSpec(mode="lora", lora_r=4))
    train_mod.seed_everything(spec.seed, CPU)
    base = load_model(spec).model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        adapted = apply_finetune(spec, base)
        assert torch.equal(adapted(input_ids=ids).logits, reference)  # LoRA's B starts at 0
    # q_proj 32 -> 32 and v_proj 32 -> 16 (one of two kv heads): r x (in + out) per adapter
    per_layer = 4 * (32 + 32) + 4 * (32 + 16)
    assert sum(p.numel() for p in trainable_parameters(adapted)) == 4 * per_layer


def test_head_only_unties_a_tied_head_and_keeps_the_embeddings(tiny_models) -> None:
    spec = make_spec(tiny_models["gpt2"], "prompt-lm", FinetuneSpec(mode="head-only"))
    out, model = loaded(spec)
    assert model.lm_head.weight is not model.transformer.wte.weight
    embeddings = model.transformer.wte.weight.detach().clone()
    two_steps(spec, model, out.tokenizer)
    assert torch.equal(model.transformer.wte.weight, embeddings)
    assert not torch.equal(model.lm_head.weight, embeddings)
    vocab = model.config.vocab_size
    assert sum(p.numel() for p in trainable_parameters(model)) == vocab * 32


def test_optimizer_holds_only_trainable_parameters(tiny_models) -> None:
    spec = make_spec(tiny_models["opt"], "prompt-cls", FinetuneSpec(mode="head-only"))
    _, model = loaded(spec)
    optimizer = train_mod.make_optimizer(spec, model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert params == [model.score.weight]


@pytest.mark.parametrize(
    ("family", "finetune"),
    [
        ("llama", FinetuneSpec(mode="last-n", last_n=1)),
        ("gpt2", FinetuneSpec(mode="lora")),
        ("opt", FinetuneSpec(mode="head-only")),
    ],
)
def test_resume_in_a_non_full_mode_equals_an_uninterrupted_run(
    tiny_models, tmp_path, family: str, finetune: FinetuneSpec
) -> None:
    from test_train import make_data

    spec = make_spec(tiny_models[family], "prompt-lm", finetune, lr=1e-3)

    def fit(**kw):
        out, model = loaded(spec)
        data = make_data(out.tokenizer)
        pad = out.tokenizer.pad_token_id
        return train_mod.train(spec, model, data, pad_id=pad, device=CPU, **kw)

    kept: dict[int, str] = {}

    def keep(row, folder):
        kept[row.epoch] = shutil.copytree(folder, tmp_path / str(row.epoch))

    whole = fit(on_epoch=keep)
    resumed = fit(resume_from=kept[1])
    assert [(r.epoch, r.train_loss, r.val_acc) for r in resumed.rows] == [
        (r.epoch, r.train_loss, r.val_acc) for r in whole.rows
    ]
    assert resumed.test_preds == whole.test_preds
    assert resumed.best_epoch == whole.best_epoch


def test_checkpoints_hold_only_what_trains(tiny_models, tmp_path) -> None:
    from test_train import make_data

    def checkpoint(finetune: FinetuneSpec) -> tuple[Path, set[str]]:
        spec = make_spec(tiny_models["llama"], "prompt-lm", finetune, epochs=1)
        out, model = loaded(spec)
        folder = tmp_path / finetune.label

        def keep(row, f):
            shutil.copytree(f, folder)

        data = make_data(out.tokenizer)
        pad = out.tokenizer.pad_token_id
        train_mod.train(spec, model, data, pad_id=pad, device=CPU, on_epoch=keep)
        return folder / train_mod.CHECKPOINT_FILE, {
            n for n, p in model.named_parameters() if p.requires_grad
        }

    full, _ = checkpoint(FinetuneSpec())
    last, last_names = checkpoint(FinetuneSpec(mode="last-n", last_n=1))
    state = torch.load(last, weights_only=True)
    assert set(state["model"]) == last_names
    assert len(state["optimizer"]["state"]) == len(last_names) == LAYER_TENSORS["llama"] + 2
    # the tiny Llama's embeddings and head (2 x 50257 x 32) dominate: last-1 trains the head,
    # full also the embeddings and 3 more layers: its checkpoint is about twice the size
    assert last.stat().st_size < 0.6 * full.stat().st_size


def test_a_trial_records_trainable_and_total_parameters(tiny_models, local_tasks) -> None:
    spec = dataclasses.replace(
        make_spec(tiny_models["gpt2"], "vanilla-cls", FinetuneSpec(mode="head-only"), epochs=1),
        task=local_tasks["sst2"],
    )
    result, _ = run_trial(spec)
    full, _ = run_trial(dataclasses.replace(spec, finetune=FinetuneSpec()))
    assert result.n_trainable_params == 2 * 32  # score: 32 hidden -> 2 classes, no bias
    assert full.n_trainable_params == full.n_params == result.n_params > 50257 * 32


# --- refusals and labels ------------------------------------------------------------------


def test_qlora_is_refused_on_cpu_before_any_model_loads(tmp_path) -> None:
    spec = make_spec(tmp_path / "no-such-model", "prompt-lm", FinetuneSpec(mode="qlora"))
    with pytest.raises(SpecError, match=r"needs a CUDA GPU .* runtime.device is cpu; use lora"):
        check_finetune(spec.finetune, spec.layers, spec.runtime.device)
    with pytest.raises(SpecError, match="needs a CUDA GPU") as e:
        run_trial(spec)
    assert "\n" not in str(e.value)
    auto = dataclasses.replace(spec, runtime=RuntimeSpec(device="auto"))
    # whether a GPU is visible is known only where the trial runs
    check_finetune(auto.finetune, auto.layers, auto.runtime.device)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="runs on cpu; use lora on a CPU, or run on a GPU"):
            run_trial(auto)


def test_last_n_beyond_the_kept_layers_names_the_fix(tmp_path) -> None:
    spec = make_spec(tmp_path, "prompt-lm", FinetuneSpec(mode="last-n", last_n=5))
    with pytest.raises(SpecError) as e:
        check_finetune(spec.finetune, spec.layers, spec.runtime.device)
    assert str(e.value) == (
        "finetune: last-5 trains the last 5 layers but 4 are kept; use last-1..last-4, "
        "or keep more layers"
    )


@pytest.mark.parametrize(
    ("finetune", "message"),
    [
        (FinetuneSpec(mode="partial"), "finetune.mode: unknown mode 'partial'; use one of full"),
        (FinetuneSpec(mode="full", lora_r=4), "finetune.lora_r: only modes lora and qlora"),
        (FinetuneSpec(mode="lora", last_n=2), "finetune.last_n: only mode last-n reads it"),
        (FinetuneSpec(mode="lora", lora_r=0), "finetune.lora_r: rank 0 is below 1"),
        (FinetuneSpec(mode="lora", lora_dropout=1.0), "finetune.lora_dropout: 1.0 is outside"),
    ],
)
def test_invalid_finetune_settings_are_refused(finetune, message) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        check_finetune(finetune, 4, "cpu")


def test_unknown_lora_targets_name_the_modules_there(tiny_models) -> None:
    spec = make_spec(
        tiny_models["opt"], "prompt-lm", FinetuneSpec(mode="lora", lora_targets=("c_attn",))
    )
    with pytest.raises(SpecError, match=r"no module named c_attn .*; set lora targets to some of"):
        loaded(spec)


def test_labels_tell_distinct_specs_apart() -> None:
    labels = [
        FinetuneSpec().label,
        FinetuneSpec(mode="head-only").label,
        FinetuneSpec(mode="last-n", last_n=3).label,
        FinetuneSpec(mode="lora").label,
        FinetuneSpec(mode="lora", lora_r=16).label,
        FinetuneSpec(mode="lora", lora_r=16, lora_alpha=32).label,
        FinetuneSpec(mode="lora", lora_dropout=0.1, lora_targets=("q_proj", "v_proj")).label,
        FinetuneSpec(mode="qlora").label,
    ]
    assert labels == [
        "full",
        "head-only",
        "last-3",
        "lora",
        "lora-r16",
        "lora-r16-a32",
        "lora-d0.1-q_proj+v_proj",
        "qlora",
    ]


@pytest.mark.parametrize("head", ["prompt-lm", "vanilla-cls"])
def test_qlora_quantises_the_decoder_linears_and_trains_adapters_only(tiny_models, head) -> None:
    # The product refuses qlora off CUDA (check_device); bitsandbytes' CPU backend runs the
    # same quantised layers, so the mode itself is checked here.
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    spec = make_spec(tiny_models["llama"], head, FinetuneSpec(mode="qlora"))
    out, model = loaded(spec)
    model = model.to(CPU)  # quantises on the move
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    assert {m.weight.dtype for m in quantised} == {torch.uint8}
    assert sum(isinstance(m, LoraLinear4bit) for m in model.modules()) == 4 * 2  # q, v
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    two_steps(spec, model, out.tokenizer)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in changed if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 16
    assert changed - adapters == (
        set() if head == "prompt-lm" else {"score.modules_to_save.default.weight"}
    )


def test_qlora_refuses_a_family_without_linear_layers(tiny_models) -> None:
    pytest.importorskip("bitsandbytes")
    spec = make_spec(tiny_models["gpt2"], "prompt-lm", FinetuneSpec(mode="qlora"))
    with pytest.raises(SpecError, match=r"no nn.Linear weights to quantise \(GPT-2's are Conv1D"):
        loaded(spec)
