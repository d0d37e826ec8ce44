"""The `finetunes:` grid axis: default and ids, spellings and the mapping form, one-line
errors with close matches, `plan`'s column and its GPU-hour estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import GridError, load_grid
from slimsweep.orchestrator.plan import expand, gpu_hours
from slimsweep.workers.spec import FinetuneSpec

MINIMAL = """
name: t
models:
  - name: gpt2
    source: openai-community/gpt2
    layers: [12, 2]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1]
"""


def grid_of(tmp_path: Path, extra: str = ""):
    p = tmp_path / "g.yaml"
    p.write_text(MINIMAL + extra)
    return load_grid(p)


def error_of(tmp_path: Path, extra: str) -> str:
    with pytest.raises(GridError) as e:
        grid_of(tmp_path, extra)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "g.yaml") in msg
    return msg


def test_default_is_full_and_keeps_the_trial_ids(tmp_path) -> None:
    plain = expand(grid_of(tmp_path))
    explicit = expand(grid_of(tmp_path, "finetunes: [full]\n"))
    assert [s.trial_id for s in plain] == [s.trial_id for s in explicit]
    assert {s.finetune for s in plain} == {FinetuneSpec()}
    # (tests/unit/test_grid.py pins the paper grid's ids, which have no `finetunes:` key)


def test_every_spelling_expands_to_its_own_trials(tmp_path) -> None:
    extra = (
        "finetunes: [full, head-only, last-2, lora, {lora: {r: 16, alpha: 32, dropout: 0.1, "
        "targets: [c_attn]}}]\n"
    )
    specs = expand(grid_of(tmp_path, extra))
    assert len(specs) == 2 * 5 * 2  # layers x finetunes x seeds
    assert len({s.trial_id for s in specs}) == 20
    labels = list(dict.fromkeys(s.axes()["finetune"] for s in specs))
    assert labels == ["full", "head-only", "last-2", "lora", "lora-r16-a32-d0.1-c_attn"]
    mapped = next(s.finetune for s in specs if s.finetune.lora_r == 16)
    assert mapped == FinetuneSpec(
        mode="lora", lora_r=16, lora_alpha=32, lora_dropout=0.1, lora_targets=("c_attn",)
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "finetunes: [lasst-3]\n",
            "finetunes[0]: unknown finetune 'lasst-3'; did you mean 'last-N'?",
        ),
        ("finetunes: [loar]\n", "finetunes[0]: unknown finetune 'loar'; did you mean 'lora'?"),
        ("finetunes: [last-N]\n", "finetunes[0]: write how many layers train, e.g. last-3"),
        (
            "finetunes: [last-3]\n",
            "finetunes[0]: model 'gpt2' at 2 layers: finetune: last-3 trains the last 3 layers "
            "but 2 are kept; use last-1..last-2, or keep more layers",
        ),
        ("finetunes: [{lora: {rnk: 4}}]\n", "finetunes[0].lora.rnk: unknown key"),
        (
            "finetunes: [{lora: {r: 0}}]\n",
            "finetunes[0]: model 'gpt2' at 12 layers: finetune.lora_r",
        ),
        ("finetunes: [{full: {r: 4}}]\n", "finetunes[0]: full takes no settings"),
        ("finetunes: [lora, {lora: {}}]\n", "finetunes[1]: duplicate finetune lora"),
        (
            "finetunes: [qlora]\nruntime: {device: cpu}\n",
            "finetunes[0]: model 'gpt2' at 12 layers: finetune: qlora needs a CUDA GPU",
        ),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, extra: str, message: str) -> None:
    assert message in error_of(tmp_path, extra)


def test_qlora_plans_when_the_device_is_not_known_to_be_a_cpu(tmp_path) -> None:
    specs = expand(grid_of(tmp_path, "finetunes: [qlora]\n"))
    assert {s.finetune.label for s in specs} == {"qlora"}


def test_gpu_hours_scale_the_measured_step_costs_by_parameters(tmp_path) -> None:
    extra = "finetunes: [full]\ntraining: {epochs: 2}\ndata: {train_size: 100}\n"
    specs = [s for s in expand(grid_of(tmp_path, extra)) if s.layers == 12]
    # GPT-2 at 12 layers: 124.355328M parameters (orchestrator.models.estimate_params).
    # Per epoch 100 steps x 0.09 ms/M + 1000 valid x 0.0015 ms/M, then 1000 test examples:
    # (2 x (1119.197952 + 186.532992) + 186.532992) ms = 2797.99488 ms per seed, two seeds.
    est = gpu_hours(specs)
    assert est.hours == pytest.approx(2 * 2797.99488 / 1000 / 3600)
    assert est.hours_at_20 == est.hours  # two epochs: early stopping changes nothing
    assert est.unknown == 0


def test_plan_shows_the_axis_and_the_estimate(tmp_path, capsys) -> None:
    grid_of(tmp_path, "finetunes: [full, last-2]\n")
    assert main(["plan", str(tmp_path / "g.yaml")]) == 0
    out = capsys.readouterr().out
    assert "  finetunes  full, last-2\n" in out
    # two seeds: each depth's full trials are one bundle, last-2 trains alone
    fusion = "on a GPU: 4 trials in 2 bundles of up to 2 seeds, as many as fit; 4 alone"
    assert f"  fusion    {fusion}\n" in out
    assert "GPU-hours, an estimate (one trial at a time on an H100" in out
    assert main(["plan", str(tmp_path / "g.yaml"), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(",selection,finetune")
    assert [line.rsplit(",", 1)[1] for line in lines[1:3]] == ["full", "full"]
    assert lines[3].endswith(",last-2")


def test_reassessing_grid_removes_a_quarter_of_llama_3_layers() -> None:
    grid = load_grid(Path(__file__).resolve().parents[2] / "grids" / "reassessing.yaml")
    specs = expand(grid)
    assert {s.layers for s in specs} == {21}  # 0.75 of Llama-3.2-3B's 28 layers
    assert [f.label for f in grid.finetunes] == ["full", "last-3", "lora"]
    assert len({s.selection.method for s in specs}) == 8  # every selection method
    assert len(specs) == 4 * 8 * 3 * 5  # tasks x selections x finetunes x seeds
