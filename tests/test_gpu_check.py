"""python -m tinytf.gpu_check without a GPU: its refusals, and the helpers its GPU sections are made of.

The GPU sections themselves (timing on CuPy and torch, the pytest and training subprocesses on cuda) need a GPU; here
their control flow runs on fakes: a clock that advances when told, measurements that raise, hand-written reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinytf import gpu_check
from tinytf.cli import UserError
from tinytf.gpu_check import (
    CUPY_NAIVE,
    TINYTF_KERNEL,
    TORCH_SDPA,
    AttentionCase,
    TimeBudget,
    Timing,
    attention_cases,
    attention_flops,
    naive_memory_estimate,
    naive_memory_skip_reason,
    run_attention_cases,
    summarize_junit,
    summarize_metrics,
    time_calls,
)

REPOSITORY = Path(__file__).resolve().parents[1]
GiB = 2**30


def real_gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


# --- the command line's refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("standin", ["0", "1"], ids=["stand-in-off", "stand-in-on"])
def test_without_a_gpu_it_prints_one_error_line_exits_2_and_writes_nothing(tmp_path, standin):
    if standin == "0" and real_gpu_present():
        pytest.skip("this machine has a GPU: the check would run")
    out = tmp_path / "report"
    env = {**os.environ, "TINYTF_CUDA_STANDIN": standin,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    job = subprocess.run([sys.executable, "-m", "tinytf.gpu_check", "--out", str(out)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert job.returncode == 2
    assert job.stderr.startswith("tinytf.gpu_check: error: no CUDA GPU: ")
    assert job.stderr.count("\n") == 1 and "Traceback" not in job.stderr
    assert ("stand-in" in job.stderr) == (standin == "1")
    assert not out.exists()


def test_a_previous_report_is_refused_without_overwrite_and_kept_when_no_gpu_is_found(tmp_path, capsys):
    (tmp_path / "gpu_check.json").write_text("{}")
    (tmp_path / "train-gpt2").mkdir()
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "holds a previous report" in capsys.readouterr().err
    # --overwrite passes the folder check; the missing GPU then stops the run before anything is removed
    assert gpu_check.main(["--out", str(tmp_path), "--overwrite"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert (tmp_path / "gpu_check.json").read_text() == "{}" and (tmp_path / "train-gpt2").is_dir()


def test_a_folder_of_other_files_or_a_file_is_refused_as_out(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty \\(notes.txt\\)"):
        gpu_check.check_output_folder(tmp_path, overwrite=False)
    with pytest.raises(UserError, match="is a file"):
        gpu_check.check_output_folder(tmp_path / "notes.txt", overwrite=True)
    gpu_check.check_output_folder(tmp_path / "new", overwrite=False)


def test_overwrite_removes_only_the_report_files(tmp_path):
    for name in ("gpu_check.json", "gpu_check.md", "pytest-junit.xml"):
        (tmp_path / name).write_text("old")
    (tmp_path / "train-llama").mkdir()
    (tmp_path / "train-llama" / "metrics.jsonl").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    gpu_check.prepare_output_folder(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps must be at least 1"),
    (["--train-iters", "0"], "--train-iters must be at least 1"),
    (["--time-limit", "0"], "--time-limit must be positive"),
    (["--test-workers", "-1"], "--test-workers must be 0 or more, got -1"),
    (["--data", "no/such/file.txt"], "--data no/such/file.txt: no such file"),
])
def test_bad_arguments_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        gpu_check.check_arguments(gpu_check.build_parser().parse_args(argv))


def test_quick_shortens_the_defaults_it_was_not_given():
    args = gpu_check.build_parser().parse_args(["--quick", "--train-iters", "50"])
    gpu_check.check_arguments(args)
    assert (args.train_iters, args.bench_budget) == (50, gpu_check.QUICK_BENCH_BUDGET_S)


def test_missing_test_tools_name_the_install_and_the_way_around(monkeypatch):
    real_find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name: None if name == "hypothesis" else real_find_spec(name))
    with pytest.raises(UserError, match="need hypothesis: pip install pytest hypothesis .* or pass --skip-tests"):
        gpu_check.check_test_tools()


def test_the_source_tree_is_found_beside_the_package_and_not_elsewhere(tmp_path):
    assert gpu_check.find_source_tree() == REPOSITORY
    assert gpu_check.find_source_tree(tmp_path) is None


# --- subprocesses -----------------------------------------------------------------------------------------------------
def test_the_pytest_command_selects_the_gpu_tests_or_everything(tmp_path):
    gpu = gpu_check.pytest_command(REPOSITORY / "tests", tmp_path / "j.xml", "gpu")
    assert gpu[gpu.index("-k") + 1] == "(cuda or gpu) and not emulator and not nvrtc"
    assert f"--junitxml={tmp_path / 'j.xml'}" in gpu and gpu[-1] == str(REPOSITORY / "tests")
    assert "-k" not in gpu_check.pytest_command(REPOSITORY / "tests", tmp_path / "j.xml", "all")
    assert "-n" not in gpu


def test_test_workers_go_to_xdist_and_need_it(tmp_path, monkeypatch):
    command = gpu_check.pytest_command(REPOSITORY / "tests", tmp_path / "j.xml", "gpu", workers=8)
    assert command[command.index("-n") + 1] == "8" and command[-1] == str(REPOSITORY / "tests")
    real_find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name: None if name == "xdist" else real_find_spec(name))
    gpu_check.check_test_tools(0)
    with pytest.raises(UserError, match="--test-workers 8 needs pytest-xdist"):
        gpu_check.check_test_tools(8)


def test_children_run_with_the_stand_in_off_and_this_tinytf_first_on_the_path(monkeypatch):
    monkeypatch.setenv("TINYTF_CUDA_STANDIN", "1")
    env = gpu_check.child_environment({"HYPOTHESIS_PROFILE": "ci"})
    assert env["TINYTF_CUDA_STANDIN"] == "0" and env["HYPOTHESIS_PROFILE"] == "ci"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPOSITORY)


def test_the_training_command_runs_the_gpu_configuration_on_cuda(tmp_path):
    command = gpu_check.training_command("llama", tmp_path, 200, None)
    flags = dict(zip(command[3::2], command[4::2]))
    assert command[1:3] == ["-m", "tinytf.train"]
    assert flags["--device"] == "cuda" and flags["--preset"] == "llama" and flags["--eval-interval"] == "50"
    assert (flags["--n-layer"], flags["--n-embd"], flags["--block-size"], flags["--batch-size"]) == \
        ("6", "384", "256", "64")


def test_a_child_past_its_time_is_interrupted_and_reported_as_timed_out(tmp_path):
    log = tmp_path / "log.txt"
    quick = gpu_check.run_bounded([sys.executable, "-c", "print('hi'); raise SystemExit(3)"], 60, dict(os.environ),
                                  tmp_path, log)
    assert (quick.exit_status, quick.timed_out) == (3, False) and log.read_text() == "hi\n"
    started = time.perf_counter()
    slow = gpu_check.run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], 0.5, dict(os.environ),
                                 tmp_path, log)
    assert slow.timed_out and slow.exit_status != 0  # KeyboardInterrupt from the SIGINT
    assert time.perf_counter() - started < 30


# --- pure helpers -----------------------------------------------------------------------------------------------------
def test_flops_follow_flash_attentions_count():
    assert attention_flops(1, 16, 1024, 1024, 64, is_causal=False, backward=False) == 4 * 16 * 1024 * 1024 * 64
    assert attention_flops(2, 8, 512, 256, 128, is_causal=False, backward=True) == 2.5 * 4 * 2 * 8 * 512 * 256 * 128
    assert attention_flops(1, 16, 4096, 4096, 128, is_causal=True, backward=True) == \
        0.5 * attention_flops(1, 16, 4096, 4096, 128, is_causal=False, backward=True)
    case = AttentionCase(TINYTF_KERNEL, 2048, 64, is_causal=True, backward=False)
    assert case.flops == attention_flops(1, 16, 2048, 2048, 64, is_causal=True, backward=False)


def test_naive_runs_only_where_its_score_matrices_fit_in_half_the_free_memory():
    forward = AttentionCase(CUPY_NAIVE, 16384, 128, is_causal=False, backward=False)
    both = AttentionCase(CUPY_NAIVE, 16384, 128, is_causal=False, backward=True)
    scores = 16 * 16384 * 16384 * 4  # 16 GiB for B = 1, H = 16
    assert (naive_memory_estimate(forward), naive_memory_estimate(both)) == (3 * scores, 5 * scores)
    assert naive_memory_skip_reason(forward, free_bytes=140 * GiB) is None  # 48 GiB <= 70 GiB
    reason = naive_memory_skip_reason(both, free_bytes=140 * GiB)  # 80 GiB > 70 GiB
    assert reason == "skipped: would need ~80 GiB (5 score matrices), more than 50% of the 140 GiB free"


def test_cases_run_shortest_length_first_for_every_configuration():
    cases = attention_cases([512, 1024], [64, 128], [TINYTF_KERNEL, CUPY_NAIVE, TORCH_SDPA], ("bfloat16", "float32"))
    assert len(cases) == 2 * 2 * 2 * 2 * 2 * 3
    assert [case.seq_len for case in cases] == [512] * 48 + [1024] * 48
    assert {case.configuration for case in cases[:48]} == {case.configuration for case in cases[48:]}
    assert [case.dtype for case in cases[:48]] == ["bfloat16"] * 24 + ["float32"] * 24


def test_torch_is_held_to_its_flash_kernel_in_half_precision_only():
    pytest.importorskip("torch", reason="torch (the interop extra) names the SDPA backends")
    assert [b.name for b in gpu_check.torch_sdpa_backends("bfloat16")] == ["FLASH_ATTENTION"]
    assert "MATH" in [b.name for b in gpu_check.torch_sdpa_backends("float32")]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_calls_synchronizes_around_each_call():
    clock, events = FakeClock(), []

    def run():
        events.append("run")
        clock.now += 0.25

    times = time_calls(run, lambda: events.append("sync"), reps=3, clock=clock)
    assert times == [0.25, 0.25, 0.25] and events == ["sync", "run", "sync"] * 3


def test_the_case_loop_records_measurements_skips_errors_and_the_budget():
    clock, saved = FakeClock(), []
    seconds_per_call = {512: 0.5, 1024: 2.0, 2048: 8.0}

    def measure(case):
        if case.implementation == TORCH_SDPA:
            raise RuntimeError("CUDA out of memory")
        clock.now += 3 * seconds_per_call[case.seq_len]
        return Timing([seconds_per_call[case.seq_len]] * 3, peak_extra_bytes=1024)

    def skip_reason(case):
        return "skipped: would need ~1 GiB" if case.implementation == CUPY_NAIVE else None

    cases = [AttentionCase(name, T, 64, is_causal=False, backward=False)
             for T in (512, 1024, 2048) for name in (TINYTF_KERNEL, CUPY_NAIVE, TORCH_SDPA)]
    results = run_attention_cases(cases, measure, skip_reason, budget_s=10, calls_per_case=3, clock=clock,
                                  on_result=lambda records: saved.append(len(records)))
    assert saved == list(range(1, len(cases) + 1))
    kernel, naive, torch = results[:3]
    assert kernel["status"] == "ok" and kernel["median_s"] == 0.5 and kernel["peak_extra_bytes"] == 1024
    assert kernel["tflops"] == pytest.approx(4 * 16 * 512 * 512 * 64 / 0.5 / 1e12)
    assert naive["status"] == "skipped: would need ~1 GiB" and "median_s" not in naive
    assert torch["status"] == "error" and torch["error"] == "RuntimeError: CUDA out of memory"
    # T = 1024 is predicted at 0.5 s x 4 x 3 calls = 6 s, and 8.5 s are left: it runs, and spends 6 s
    assert results[3]["status"] == "ok"
    # T = 2048: predicted 2 s x 4 x 3 = 24 s with 2.5 s left
    assert results[6]["status"] == "skipped: time budget (predicted 24 s, 2 s of 10 s left)"


def test_a_spent_budget_skips_every_later_case():
    clock = FakeClock()

    def measure(case):
        clock.now += 20
        return Timing([1.0], peak_extra_bytes=0)

    cases = [AttentionCase(TINYTF_KERNEL, 512, D, is_causal=False, backward=False) for D in (64, 128)]
    results = run_attention_cases(cases, measure, lambda case: None, budget_s=10, calls_per_case=3, clock=clock)
    assert [r["status"] for r in results] == ["ok", "skipped: time budget (0 s of 10 s left)"]


def test_the_sections_share_the_time_limit_and_keep_what_later_ones_are_promised():
    clock = FakeClock()
    budget = TimeBudget(420, clock=clock)
    assert budget.share(240, promised_later_s=120) == 240
    clock.now = 240
    assert budget.share(90, promised_later_s=75) == 90
    clock.now = 400
    assert budget.share(90, promised_later_s=30) == 0


def test_cuda_versions_read_as_major_dot_minor():
    assert gpu_check.cuda_version_text(12090) == "12.9"
    assert gpu_check.cuda_version_text(13000) == "13.0"
    assert gpu_check.cuda_version_text(0) == "none"


JUNIT_XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5">
<testcase classname="tests.test_tensor" name="test_add[cuda]" time="0.1"/>
<testcase classname="tests.kernels.test_flash_attention_gpu" name="test_gpu_matches_reference[1-1-64-causal]">
  <failure message="AssertionError: max error 0.5&#10;second line&#10;third line&#10;fourth line">trace</failure>
</testcase>
<testcase classname="tests.test_train" name="test_training[cuda]"><error message="">fixture broke</error></testcase>
<testcase classname="tests.test_a" name="test_b"><skipped type="pytest.skip" message="needs two GPUs"/></testcase>
<testcase classname="tests.test_a" name="test_c"><skipped type="pytest.skip" message="needs two GPUs"/></testcase>
</testsuite></testsuites>"""


def test_junit_xml_gives_counts_failures_with_their_first_lines_and_skip_reasons():
    summary = summarize_junit(JUNIT_XML)
    assert {key: summary[key] for key in ("passed", "failed", "skipped", "errors")} == \
        {"passed": 1, "failed": 1, "skipped": 2, "errors": 1}
    assert summary["problems"] == [
        {"test": "tests.kernels.test_flash_attention_gpu::test_gpu_matches_reference[1-1-64-causal]",
         "outcome": "failed", "message": ["AssertionError: max error 0.5", "second line", "third line"]},
        {"test": "tests.test_train::test_training[cuda]", "outcome": "error", "message": ["fixture broke"]},
    ]
    assert summary["skip_reasons"] == {"needs two GPUs": 2} and summary["problems_left_out"] == 0


def test_metrics_give_first_and_last_losses_and_throughput(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"iter": 50, "train_loss": 2.5, "val_loss": 2.6, "lr": 1e-3, "tokens_per_s": 1e5, "elapsed_s": 10},
               {"iter": 100, "train_loss": 2.0, "val_loss": 2.2, "lr": 1e-4, "tokens_per_s": 2e5, "elapsed_s": 16}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    summary = summarize_metrics(path, tokens_per_step=64 * 256)
    assert summary["first"] == {"iter": 50, "train_loss": 2.5, "val_loss": 2.6}
    assert summary["last"] == {"iter": 100, "train_loss": 2.0, "val_loss": 2.2}
    assert summary["loss_fell"] is True and summary["tokens_per_s_last_window"] == 2e5
    assert summary["tokens_per_s_overall"] == 100 * 64 * 256 / 16
    path.write_text(json.dumps(records[0]) + "\n")
    assert summarize_metrics(path, 1)["loss_fell"] is None
    assert summarize_metrics(tmp_path / "missing.jsonl", 1) == {"evaluations": 0}


def fake_report() -> dict:
    """A report as the sections write it, with made-up values: for the renderer only."""
    ok = {"implementation": TINYTF_KERNEL, "dtype": "bfloat16", "T": 512, "S": 512, "D": 64, "causal": True, "pass": "forward", "B": 1,
          "H": 16, "status": "ok", "median_s": 0.002, "times_s": [0.002], "tflops": 1.5, "peak_extra_bytes": 3 * 2**20}
    return {
        "format_version": 1, "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:07:00+00:00",
        "command": "python -m tinytf.gpu_check --out x",
        "problems": ["training llama: loss did not fall (exit status 0)"],
        "environment": {
            "gpus": [{"index": 0, "name": "Fake GPU", "compute_capability": "9.0", "multiprocessors": 132,
                      "memory_total_bytes": 140 * GiB, "memory_free_bytes": 139 * GiB}],
            "gpu_count": 1, "driver_cuda": "12.8", "runtime_cuda": "12.9", "nvrtc": "12.9", "cupy": "14.2.0",
            "cupy_wheels": {"cupy-cuda12x": "14.2.0"}, "numpy": "2.4.6", "python": "3.11.7", "platform": "Linux",
            "tinytf": "0.1.0", "tinytf_location": "/src/tinytf", "git_commit": "abc1234",
            "environment_variables": {"CUDA_VISIBLE_DEVICES": "0", "CUPY_TF32": None}, "torch": "not installed"},
        "tests": "skipped: --skip-tests",
        "training": {
            "gpt2": {"command": "python -m tinytf.train", "iters": 200, "batch_size": 64, "block_size": 256,
                     "exit_status": 0, "timed_out": False, "timeout_s": 90, "wall_s": 41.5,
                     "log": "train-gpt2/train.log",
                     "evaluations": 4, "first": {"iter": 50, "train_loss": 2.8, "val_loss": 2.9},
                     "last": {"iter": 200, "train_loss": 2.1, "val_loss": 2.3}, "loss_fell": True, "training_s": 30,
                     "tokens_per_s_last_window": 123456.0, "tokens_per_s_overall": 100000.0, "status": "done"},
            "llama": {"status": "error", "error": "KeyError: 'iter'",
                      "traceback": ["Traceback ...", "KeyError: 'iter'"]},
        },
        "attention": {"B": 1, "H": 16, "dtypes": ["bfloat16", "float32"], "implementations": [TINYTF_KERNEL, CUPY_NAIVE],
                      "timing_method": "wall clock", "memory_method": "pool bytes", "naive_skip_rule": "half",
                      "torch": "torch not installed",
                      "results": [ok, {**ok, "implementation": CUPY_NAIVE, "status": "skipped: would need ~9 GiB"}]},
    }


def test_the_markdown_shows_each_section_as_tables():
    text = gpu_check.render_markdown(fake_report())
    assert text.startswith("# tinytf GPU check\n")
    assert "Problems: training llama: loss did not fall (exit status 0)." in text
    assert "| GPU 0 | Fake GPU, compute capability 9.0, 132 SMs, 140.0 GiB (139.0 GiB free) |" in text
    assert "| CUDA_VISIBLE_DEVICES | 0 |" in text and "CUPY_TF32" not in text
    assert "## Tests\n\nskipped: --skip-tests" in text
    assert ("| gpt2 | done (exit 0) | iter 50: 2.800 / 2.900 | iter 200: 2.100 / 2.300 | yes | 123,456 | 100,000 "
            "| 41.5 s |") in text
    assert "| llama | error: KeyError: 'iter' |" in text
    assert "| bfloat16 | forward | yes | 64 | 512 | 2.00 ms, 1.5 TFLOP/s, 3 MiB | skipped: would need ~9 GiB | - |" in text
    assert "torch is left out: torch not installed." in text


def test_problems_name_failed_sections_and_bugs():
    report = fake_report()
    report["tests"] = {"command": "pytest", "status": "failed", "failed": 2, "errors": 0}
    report["attention"]["results"][0] = {**report["attention"]["results"][0], "status": "error", "error": "x"}
    assert gpu_check.problems_of(report) == ["training llama raised KeyError: 'iter'",
                                             "tests failed: 2 failed, 0 errors", "1 attention case(s) raised an error"]


def test_the_report_is_replaced_whole(tmp_path):
    gpu_check.save_report(tmp_path, fake_report())
    assert json.loads((tmp_path / "gpu_check.json").read_text())["training"]["gpt2"]["status"] == "done"
    assert (tmp_path / "gpu_check.md").read_text().startswith("# tinytf GPU check")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
