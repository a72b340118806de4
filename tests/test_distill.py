"""Short real distillation runs: timm test models at 32 px on a few hundred Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edgekd.data import LoadedData, load_data
from edgekd.distill import DistillConfig, distill, parse_loss_specs
from edgekd.distill.sampling import EpochSampler
from edgekd.distill.state import TEACHER_CACHE_ENV, TeacherCache
from edgekd.distill.students import load_student, read_student_checkpoint
from edgekd.distill.teacher import prepare_teacher
from edgekd.distill.views import MirrorDraw, view_rows
from edgekd.errors import EdgekdError
from edgekd.types import DataSpec, TeacherSpec, TrainConfig
from tests.helpers.interrupt import InterruptAfter

pytestmark = pytest.mark.slow
SPEC = DataSpec("fashion-mnist", max_train=192, max_val=64)
QUICK = DistillConfig(epochs=1, batch_size=32, num_workers=0, lr=3e-3)


@pytest.fixture(scope="module")
def data() -> LoadedData:
    return load_data(SPEC)


@pytest.fixture(scope="module")
def teachers(data, tmp_path_factory):
    """Two small real teachers, fine-tuned briefly (a CNN and a ViT, so features must be adapted)."""
    root = tmp_path_factory.mktemp("teachers")
    return [prepare_teacher(TeacherSpec(name, random_init=True), data, root / name, image_size=(32, 32),
                            train_config=TrainConfig(epochs=2, batch_size=32, num_workers=0, lr=3e-3))
            for name in ("test_resnet", "test_vit")]


def test_multi_teacher_run_writes_a_loadable_student_and_a_log(data, teachers, tmp_path):
    config = replace(QUICK, losses=parse_loss_specs(["ce=1,kd=1,fitnet=0.5,at=1,sp=1"]))
    checkpoint = distill(teachers, "test_efficientnet", data, config, tmp_path)
    assert 0.0 <= checkpoint.val_top1 <= 1.0 and 0.0 <= checkpoint.teacher_agreement <= 1.0
    log = json.loads((tmp_path / "distill_log.json").read_text())
    assert len(log["feature_pairs"]) == 2 and log["feature_pairs"][1][-1].endswith("->blocks.5")
    epoch = log["epoch_log"][0]
    assert {"loss", "ce", "kd", "fitnet", "at", "sp", "val_top1", "images_per_s", "lr"} <= set(epoch)
    reloaded = read_student_checkpoint(tmp_path)
    assert reloaded.val_top1 == checkpoint.val_top1 and reloaded.weights_path == tmp_path / "student.safetensors"
    student = load_student(reloaded)  # the saved weights are the student alone, without the adapters
    assert sum(p.numel() for p in student.parameters()) == sum(t.numel() for t in load_file(
        str(reloaded.weights_path)).values() if t.is_floating_point()) - _buffers(student)


def _buffers(model: torch.nn.Module) -> int:
    return sum(b.numel() for b in model.buffers() if b.is_floating_point())


def test_label_free_run_on_an_unlabeled_folder(data, teachers, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(80):
        Image.fromarray(data.train.images[i]).save(folder / f"{i:03d}.png")
    unlabeled = load_data(DataSpec(str(folder), val_fraction=0.25))
    assert not unlabeled.info.labeled
    with pytest.raises(EdgekdError, match="ce needs labels"):
        distill(teachers[:1], "test_resnet", unlabeled, replace(QUICK, losses=parse_loss_specs(["ce=1"])), tmp_path)
    config = replace(QUICK, batch_size=20, epochs=2)  # views and caching left to the recipe; 3 batches an epoch
    checkpoint = distill(teachers[:1], "test_resnet", unlabeled, config, tmp_path / "out")
    assert checkpoint.val_top1 is None and 0.0 <= checkpoint.teacher_agreement <= 1.0
    log = json.loads((tmp_path / "out" / "distill_log.json").read_text())
    assert log["losses"] == ["kd=9(standardize=1)"] and "ce" not in log["epoch_log"][0]  # the default, less ce
    # the default from random weights: fixed views, so the teacher's outputs are computed once and reused, and mixed
    # images added to each batch (unlabeled too: the teacher answers them live, beside the cached images)
    assert log["augment"] is False and log["teacher_cache"] is True
    assert (log["mix"], log["mix_extra"]) == ("mixup", 0.5)
    assert log["teacher_cache_misses"] == 60 and log["teacher_cache_hits"] == 60  # epoch 1 computes, epoch 2 reads
    uncached = distill(teachers[:1], "test_resnet", unlabeled, replace(config, cache_teacher=False), tmp_path / "plain")
    cached_weights, plain_weights = load_file(str(checkpoint.weights_path)), load_file(str(uncached.weights_path))
    for name in plain_weights:
        torch.testing.assert_close(cached_weights[name], plain_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_after_an_interruption_reaches_the_uninterrupted_result(data, teachers, tmp_path):
    config = replace(QUICK, epochs=2, losses=parse_loss_specs(["ce=1,kd=1:0.5,fitnet=1"]))
    straight = distill(teachers[:1], "test_resnet", data, config, tmp_path / "straight")
    interrupted = LoadedData(data.info, InterruptAfter(data.train, 32 * 8 + 5), data.val)  # epoch 2, 3rd batch
    with pytest.raises(KeyboardInterrupt):
        distill(teachers[:1], "test_resnet", interrupted, config, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "distill_state.pt").exists()
    assert not (tmp_path / "resumed" / "student.safetensors").exists()
    resumed = distill(teachers[:1], "test_resnet", data, replace(config, resume=True), tmp_path / "resumed")
    a, b = load_file(str(straight.weights_path)), load_file(str(resumed.weights_path))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert resumed.val_top1 == straight.val_top1
    # a Ctrl-C in an epoch's validation keeps the epoch's batches: the re-run validates it and goes on
    validating = LoadedData(data.info, data.train, InterruptAfter(data.val, 5))
    with pytest.raises(KeyboardInterrupt):
        distill(teachers[:1], "test_resnet", validating, config, tmp_path / "validating")
    saved = torch.load(tmp_path / "validating" / "distill_state.pt", weights_only=True)
    assert saved["history"] == "[]" and saved["step"] == 6  # epoch 1's 6 batches trained, not yet measured
    again = distill(teachers[:1], "test_resnet", data, replace(config, resume=True), tmp_path / "validating")
    c = load_file(str(again.weights_path))
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_ctrl_c_inside_a_step_lands_after_it(data, teachers, tmp_path):
    """Ctrl-C mid-forward (where a user's usually lands) used to keep BatchNorm statistics the saved step count did
    not include, so the resumed student differed (num_batches_tracked 9 for 8). The step now lands whole first."""
    import signal

    config = replace(QUICK, epochs=2, losses=parse_loss_specs(["ce=1,kd=1:0.5"]))
    straight = distill(teachers[:1], "test_resnet", data, config, tmp_path / "straight")
    first_norm: list[torch.nn.Module] = []
    calls = [0]

    def ctrl_c_in_a_step(module, inputs, output):  # the student's first BatchNorm, in training mode
        if not (isinstance(module, torch.nn.BatchNorm2d) and module.training):
            return
        first_norm[:] = first_norm or [module]
        if module is first_norm[0]:
            calls[0] += 1
            if calls[0] == 8:
                signal.raise_signal(signal.SIGINT)

    hook = torch.nn.modules.module.register_module_forward_hook(ctrl_c_in_a_step)
    # Python's own Ctrl-C handler, as in a terminal: a job started in the background of a script ignores SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            distill(teachers[:1], "test_resnet", data, config, tmp_path / "resumed")
    finally:
        hook.remove()
        signal.signal(signal.SIGINT, previous)
    assert 0 < torch.load(tmp_path / "resumed" / "distill_state.pt", weights_only=True)["step"] < 12
    resumed = distill(teachers[:1], "test_resnet", data, replace(config, resume=True), tmp_path / "resumed")
    a, b = load_file(str(straight.weights_path)), load_file(str(resumed.weights_path))
    for name in a:  # buffers included: running statistics and num_batches_tracked
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_of_another_configuration_is_refused_or_where_allowed_starts_over(data, teachers, tmp_path, caplog):
    """`distill --resume` with a changed option would replace the state the user asked to continue: refused, naming
    what changed. compress (start_over_if_changed) follows its options and starts over, loudly."""
    distill(teachers[:1], "test_resnet", data, replace(QUICK, losses=parse_loss_specs(["kd=1"])), tmp_path)
    saved = (tmp_path / "distill_state.pt").read_bytes()
    with pytest.raises(EdgekdError) as refused:
        distill(teachers[:1], "test_resnet", data, replace(QUICK, resume=True, lr=1e-3), tmp_path)
    assert "lr 0.003 -> 0.001" in str(refused.value) and "the loss terms" in str(refused.value)
    assert "--overwrite" in str(refused.value)
    assert (tmp_path / "distill_state.pt").read_bytes() == saved
    # a state saved before the inputs were recorded says so, instead of calling every input changed
    older = torch.load(tmp_path / "distill_state.pt", weights_only=True)
    del older["inputs"]
    (tmp_path / "older").mkdir()
    torch.save(older, tmp_path / "older" / "distill_state.pt")
    with pytest.raises(EdgekdError, match="an earlier edgekd saved it without recording them"):
        distill(teachers[:1], "test_resnet", data, replace(QUICK, resume=True, lr=1e-3), tmp_path / "older")
    with caplog.at_level("WARNING"):
        distill(teachers[:1], "test_resnet", data, replace(QUICK, resume=True, start_over_if_changed=True, lr=1e-3),
                tmp_path)
    assert "written for other inputs" in caplog.text
    assert [e["epoch"] for e in json.loads((tmp_path / "distill_log.json").read_text())["epoch_log"]] == [1]


def test_bf16_autocast_and_channels_last_run_the_gpu_code_path_on_cpu(data, teachers, tmp_path):
    """What CUDA does by default (bf16 autocast, channels_last), forced on CPU: with a ViT and a CNN teacher and
    feature losses, so the adapters and the loss terms see bf16 maps too."""
    # no mixed images (the default from random weights adds them): their two-label ce drifts past the 2% below
    quick = replace(QUICK, losses=parse_loss_specs(["ce=1,kd=1,fitnet=0.5,at=1"]), mix="none")
    fp32 = distill(teachers, "test_efficientnet", data, replace(quick, teacher_precision="fp32"), tmp_path / "fp32")
    bf16 = distill(teachers, "test_efficientnet", data, replace(quick, precision="bf16", teacher_precision="bf16",
                                                                 channels_last=True), tmp_path / "bf16")
    log, reference = (json.loads((tmp_path / name / "distill_log.json").read_text()) for name in ("bf16", "fp32"))
    assert log["compute"] == log["teacher_compute"] == "cpu, bfloat16 autocast, channels_last"
    assert reference["compute"] == reference["teacher_compute"] == "cpu, fp32"
    for term in ("loss", "ce", "kd", "fitnet", "at"):  # same data, seed and start: bf16 rounding, not a new result
        assert log["epoch_log"][0][term] == pytest.approx(reference["epoch_log"][0][term], rel=0.02), term
    assert all(t.dtype == torch.float32 for t in load_file(str(bf16.weights_path)).values() if t.is_floating_point())
    assert abs(bf16.val_top1 - fp32.val_top1) <= 0.1


def test_bf16_autocast_gives_bf16_activations_and_channels_last_weights():
    from edgekd.distill.train_utils import Compute, cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert Compute.choose(cpu) == Compute(cpu, None, False)  # training on CPU: fp32 whatever the CPU
    assert Compute.choose(cpu, inference=True).amp_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert Compute.choose(torch.device("cuda")) == Compute(torch.device("cuda"), torch.bfloat16, True)
    compute = Compute.choose(torch.device("cpu"), "bf16", channels_last=True)
    conv = compute.prepare(torch.nn.Conv2d(3, 8, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dtype == torch.float32
    with compute.autocast():
        assert conv(compute.inputs(torch.randn(2, 3, 16, 16))).dtype == torch.bfloat16
    with pytest.raises(EdgekdError, match="unknown precision 'fp8'"):
        Compute.choose(torch.device("cpu"), "fp8")


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from edgekd.distill.train_utils import cpu_has_native_bf16

    cases = {"x86_plain": "flags\t\t: fpu sse avx2 avx512f avx512bw\n", "x86_bf16": "flags\t: avx512f avx512_bf16\n",
             "amx": "flags : amx_tile amx_bf16\n", "arm": "Features\t: fp asimd bf16 i8mm\n",
             "arm_plain": "Features: fp\n"}
    found = {}
    for name, text in cases.items():
        (tmp_path / name).write_text("processor\t: 0\n" + text)
        found[name] = cpu_has_native_bf16(tmp_path / name)
    assert found == {"x86_plain": False, "x86_bf16": True, "amx": True, "arm": True, "arm_plain": False}
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler; this machine has none")
def test_compiled_student_trains_like_the_eager_one(data, teachers, tmp_path):
    config = replace(QUICK, losses=parse_loss_specs(["ce=1,kd=1"]), augment=False)
    eager = distill(teachers[:1], "test_resnet", data, config, tmp_path / "eager")
    compiled = distill(teachers[:1], "test_resnet", data, replace(config, compile=True), tmp_path / "compiled")
    a, b = (json.loads((tmp_path / name / "distill_log.json").read_text()) for name in ("eager", "compiled"))
    assert b["compiled"] and not a["compiled"]
    # inductor's fused kernels sum in another order: 1.2e-4 apart on an AMD EPYC, under 1e-4 on the Xeons
    assert b["epoch_log"][0]["loss"] == pytest.approx(a["epoch_log"][0]["loss"], rel=1e-3)
    assert compiled.val_top1 == pytest.approx(eager.val_top1, abs=0.05)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from edgekd.data import load_data
    from edgekd.distill import DistillConfig, distill, parse_loss_specs
    from edgekd.distill.students import StudentStart, build_student
    from edgekd.types import DataSpec, TeacherResult

    teacher_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    raw = json.loads((teacher_dir / "teacher.json").read_text())
    raw.pop("key")
    teacher = TeacherResult.from_dict(raw)
    data = load_data(DataSpec("fashion-mnist", max_train=192, max_val=64))
    student = build_student("test_resnet", 10, (32, 32))
    config = DistillConfig(epochs=1, batch_size=32, num_workers=0, losses=parse_loss_specs(["ce=1,kd=1,fitnet=1"]))
    checkpoint = distill([teacher], "test_resnet", data, config, out, start=StudentStart(student, "random", "random"))
    rank = os.environ["RANK"]
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"val_top1": checkpoint.val_top1}))
""")


def torchrun_two_processes(*args: str) -> list[str]:
    """A torchrun command line for two local processes on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), *args]


def test_two_process_ddp_ranks_agree(teachers, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(torchrun_two_processes(str(script), str(teachers[0].weights_path.parent), str(out)),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    written = load_file(str(out / "student.safetensors"))
    for name in rank0:
        torch.testing.assert_close(rank1[name], rank0[name], msg=name)
        torch.testing.assert_close(written[name], rank0[name], msg=name)
    assert json.loads((out / "rank0.json").read_text()) == json.loads((out / "rank1.json").read_text())
    log = json.loads((out / "distill_log.json").read_text())
    assert log["processes"] == 2


def test_readme_torchrun_command_runs_the_cli_on_two_processes(data, teachers, tmp_path):
    """`torchrun --nproc_per_node N -m edgekd.cli distill --teacher-dir ...` as the README shows it (gloo on CPU),
    with two teachers and a folder of --unlabeled-data."""
    out, extra = tmp_path / "ddp", tmp_path / "unlabeled"
    extra.mkdir()
    for i in range(40):
        Image.fromarray(data.val.images[i]).save(extra / f"{i:03d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(torchrun_two_processes(
        "-m", "edgekd.cli", "distill", "--teacher-dir", str(teachers[0].weights_path.parent), "--teacher-dir",
        str(teachers[1].weights_path.parent), "--unlabeled-data", str(extra), "--student", "test_resnet",
        "--max-train", "96", "--max-val", "32", "--epochs", "1", "--batch-size", "32", "--workers", "0",
        "--out", str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student test_resnet: validation top-1") == 1  # rank 0 reports, rank 1 does not
    log = json.loads((out / "distill_log.json").read_text())
    assert log["processes"] == 2 and log["train_images"] == 96 and log["unlabeled_images"] == 40
    assert len(log["teachers"]) == 2
    # agreement with each teacher, not with the first one only
    agreements = log["teacher_agreements"]
    assert len(agreements) == 2 and agreements[0] == log["teacher_agreement"] and 0 <= agreements[1] <= 1
    assert all(f"{name} {100 * value:.2f}%" in result.stdout for name, value in zip(log["teachers"], agreements))


def test_sigterm_checkpoints_mid_epoch_and_a_resumed_run_finishes(teachers, tmp_path):
    """`kill` (SIGTERM) mid-epoch: the CLI saves the training state first, says how to resume, exits 130."""
    out, log_path = tmp_path / "run", tmp_path / "stderr.txt"
    args = [sys.executable, "-m", "edgekd.cli", "distill", "--teacher-dir", str(teachers[0].weights_path.parent),
            "--student", "test_resnet", "--max-train", "6000", "--max-val", "32", "--epochs", "1",
            "--batch-size", "16", "--workers", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        # the epoch's progress bar is drawn when its first step starts (the set-up before it, models and teacher
        # cache, took more than the 2 s this test used to wait after "distilling on" when the machine was busy)
        while "distill epoch 1/1" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # a few dozen of the epoch's 375 steps
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    message = log_path.read_text()
    assert code == 130, message[-2000:]
    assert "interrupted: finished stages are kept; run the same command with --resume to continue" in message
    saved = torch.load(out / "distill_state.pt", map_location="cpu", weights_only=True)
    assert 0 < saved["step"] < 375 and json.loads(saved["partial"])["steps"] == saved["step"]
    assert not (out / "student.safetensors").exists()
    # the same command without --resume would start over and replace the state: refused, saying what to pass; also
    # where an earlier run of the same model finished in this folder (its card is older than the state)
    earlier = out / "student.json"
    earlier.write_text('{"model_name": "test_resnet"}')
    an_hour_before = (out / "distill_state.pt").stat().st_mtime_ns - 3600 * 10**9
    os.utime(earlier, ns=(an_hour_before, an_hour_before))
    forgot = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert forgot.returncode == 2 and "holds an interrupted distillation" in forgot.stderr, forgot.stderr[-2000:]
    assert "Traceback" not in forgot.stderr
    earlier.unlink()
    assert torch.load(out / "distill_state.pt", map_location="cpu", weights_only=True)["step"] == saved["step"]
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'distill_state.pt'} at step {saved['step']}" in resumed.stderr
    assert len(json.loads((out / "distill_log.json").read_text())["epoch_log"]) == 1


def test_cli_distill_reports_bad_input_on_one_line():
    from typer.testing import CliRunner

    from edgekd.cli import app

    result = CliRunner().invoke(app, ["distill", "--student", "test_resnet", "--teacher-dir", "nowhere",
                                      "--loss", "kd=1", "--loss", "fitnett=1"])
    assert result.exit_code == 2
    assert "unknown loss 'fitnett'" in result.output
    assert "known losses: at, ce, dist, dkd, fitnet, kd, proj, rkd, sp, wsl" in result.output
    result = CliRunner().invoke(app, ["distill", "--student", "test_resnet", "--teacher-dir", "nowhere",
                                      "--loss", "dkd=1", "--loss-option", "dkd.gama=2"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "loss 'dkd' has no option gama; its options: dkd.alpha, dkd.beta" in result.output
    result = CliRunner().invoke(app, ["distill", "--student", "test_resnet", "--teacher-dir", "nowhere",
                                      "--precision", "fp8"])
    assert result.exit_code == 2 and "Invalid value for '--precision': 'fp8' is not a precision" in result.output
    result = CliRunner().invoke(app, ["distill", "--student", "test_resnet", "--teacher-dir", "nowhere",
                                      "--mix", "blend"])
    assert result.exit_code == 2 and "Invalid value for '--mix': 'blend' is not a mixing mode" in result.output
    for command in (["distill", "--student", "test_resnet", "--teacher-dir", "nowhere"],
                    ["compress", "--teacher", "resnet18", "--budget", "10ms"]):
        result = CliRunner().invoke(app, [*command, "--mix", "none", "--mix-extra", "0.5"])
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "--mix-extra adds mixed images, and --mix is none; give --mix mixup" in result.output
    result = CliRunner().invoke(app, ["distill", "--student", "test_resnet", "--teacher-dir", "nowhere",
                                      "--temperature", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--temperature': -1 is not positive" in result.output
    # a rate that is not positive used to reach torch's optimizer, after the teacher, as a traceback
    for command in (["distill", "--teacher-dir", "nowhere"], ["compress", "--teacher", "resnet18", "--budget", "10ms"]):
        result = CliRunner().invoke(app, [*command, "--lr", "-0.01"])
        assert result.exit_code == 2 and "Invalid value for '--lr': -0.01 is not positive" in result.output


def test_cli_distill_runs_with_loss_options_and_precisions(tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app

    result = CliRunner().invoke(app, [
        "distill", "--student", "test_efficientnet", "--teacher", "test_resnet", "--random-init", "--input-size", "32",
        "--max-train", "96", "--max-val", "32", "--epochs", "1", "--teacher-epochs", "0.5", "--batch-size", "32",
        "--workers", "0", "--loss", "ce=1,dkd=1", "--loss-option", "dkd.beta=2", "--precision", "fp32",
        "--teacher-precision", "bf16", "--mix", "mixup+cutmix", "--mix-alpha", "0.5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "student test_efficientnet: validation top-1" in result.output
    log = json.loads((tmp_path / "distill_log.json").read_text())
    assert log["losses"] == ["ce=1", "dkd=1(beta=2)"] and log["teacher_compute"] == "cpu, bfloat16 autocast"
    assert log["compute"] == "cpu, fp32" and (tmp_path / "teacher" / "teacher.json").exists()
    assert (log["mix"], log["mix_alpha"]) == ("mixup+cutmix", 0.5)


def test_teacher_outputs_cached_on_disk_serve_later_runs_until_the_teacher_changes(data, teachers, tmp_path,
                                                                                     monkeypatch):
    """--cache-teacher keeps the teacher's outputs in memory-mapped files named by content: the first epoch
    computes them, the second reads them, a second run (another student seed) reads them all, another teacher gets
    its own."""
    monkeypatch.setenv(TEACHER_CACHE_ENV, str(tmp_path / "cache"))
    config = replace(QUICK, batch_size=16, augment=False, cache_teacher=True, epochs=2,
                     losses=parse_loss_specs(["ce=1,kd=1"]))

    def run(name: str, chosen, **changes) -> dict:
        distill(chosen, "test_resnet", data, replace(config, **changes), tmp_path / name)
        return json.loads((tmp_path / name / "distill_log.json").read_text())

    first = run("first", teachers[:1])
    images = len(data.train) // 16 * 16  # whole batches (drop_last)
    assert first["teacher_cache_misses"] == images and first["teacher_cache_hits"] == images  # epoch 1, epoch 2
    again = run("again", teachers[:1], seed=1)
    assert again["teacher_cache_misses"] == 0 and again["teacher_cache_hits"] == 2 * images
    other = run("other", teachers[1:2])
    assert other["teacher_cache_misses"] == images  # another teacher's outputs are not the first one's
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_projected_embedding_loss_trains_from_the_teacher_cache_and_ships_without_its_projector(data, teachers,
                                                                                                 tmp_path, monkeypatch):
    """'proj' needs only the teacher's pooled embedding, which the cache keeps with the logits: the second epoch reads
    the teacher from disk, the loss falls as the projector and the student learn, and the saved student is the
    student alone."""
    monkeypatch.setenv(TEACHER_CACHE_ENV, str(tmp_path / "cache"))
    config = replace(QUICK, batch_size=16, augment=False, cache_teacher=True, epochs=3,
                     losses=parse_loss_specs(["ce=1,proj=1"]))
    distill(teachers[1:2], "test_resnet", data, config, tmp_path / "run")  # a ViT teacher: 64-wide embedding
    log = json.loads((tmp_path / "run" / "distill_log.json").read_text())
    images = len(data.train) // 16 * 16
    assert log["teacher_cache_misses"] == images and log["teacher_cache_hits"] == 2 * images
    assert log["epoch_log"][-1]["proj"] < log["epoch_log"][0]["proj"]
    student = load_student(read_student_checkpoint(tmp_path / "run"))
    saved = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert not any(name.startswith("projectors") for name in saved)
    assert sum(p.numel() for p in student.parameters()) == sum(
        t.numel() for t in saved.values() if t.is_floating_point()) - _buffers(student)


def test_mirrored_views_fill_a_cache_row_per_view_and_read_it_back(data, teachers, tmp_path, monkeypatch):
    """--flip on fixed views: the teacher answers each view (image or mirror image) once; a view drawn again, in the
    same run or the next, comes from its own cache row."""
    monkeypatch.setenv(TEACHER_CACHE_ENV, str(tmp_path / "cache"))
    config = replace(QUICK, batch_size=16, augment=False, flip=True, cache_teacher=True, epochs=2,
                     losses=parse_loss_specs(["ce=1,kd=1"]))
    distill(teachers[:1], "test_resnet", data, config, tmp_path / "first")
    log = json.loads((tmp_path / "first" / "distill_log.json").read_text())
    # the views the run drew, from the same sampler and draw: each distinct one costs the teacher one answer
    size, steps = len(data.train), len(data.train) // 16
    sampler, draw, views = EpochSampler(size, num_replicas=1, rank=0, seed=0, drop_last=True), MirrorDraw(size, 0), []
    for epoch in range(2):
        sampler.set_position(epoch)
        indices = torch.tensor([index for index, _ in sampler][:steps * 16])
        views += view_rows(indices, draw.flipped(indices, epoch)).tolist()
    assert log["flip"] is True and log["teacher_cache"] is True
    assert log["teacher_cache_misses"] == len(set(views)) < len(views)  # views seen twice were read back
    assert log["teacher_cache_hits"] == len(views) - len(set(views))
    (folder,) = (tmp_path / "cache").iterdir()
    assert np.load(folder / "logits_0.npy", mmap_mode="r").shape[0] == 2 * size  # two rows per image
    distill(teachers[:1], "test_resnet", data, config, tmp_path / "again")  # the same views: all read back
    again = json.loads((tmp_path / "again" / "distill_log.json").read_text())
    assert again["teacher_cache_misses"] == 0 and again["teacher_cache_hits"] == len(views)


def test_teacher_cache_shared_by_two_processes_keeps_both_ones_rows(tmp_path):
    """Under torchrun each process opens the cache folder and stores its own rows, each finding the output files
    missing at first: the second must open the file the first created, not create it again over the first's rows."""
    rank0, rank1 = TeacherCache(tmp_path, 8, 1), TeacherCache(tmp_path, 8, 1)  # both before either stores
    logits, embedding = torch.arange(8 * 3, dtype=torch.float32).view(8, 3), torch.ones(8, 5)
    first, second = torch.arange(0, 4), torch.arange(4, 8)
    rank0.store(first, [(logits[first], embedding[first])])
    rank1.store(second, [(logits[second], embedding[second])])
    for cache in (rank0, rank1):
        cache.flush()
    later = TeacherCache(tmp_path, 8, 1)  # a later run reads every row back
    assert not later.missing(torch.arange(8)).any()
    (read_logits, read_embedding), = later.read(torch.arange(8), torch.device("cpu"))
    torch.testing.assert_close(read_logits, logits)
    torch.testing.assert_close(read_embedding, embedding)
    assert not list(tmp_path.glob(".*.tmp"))  # no private files left behind


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this system (macOS, Windows)")
def test_teacher_cache_reserves_its_disk_or_says_which_file_does_not_fit(tmp_path, monkeypatch, caplog):
    """The cache's files are made sparse by numpy; written through a memory map on a full disk they kill the process
    with SIGBUS. Their blocks are reserved before they are mapped: a disk without room is an OSError naming the cache
    file. A file system without fallocate keeps the sparse file. Rows marked filled whose file has gone are computed
    again, not read as zeros. (test_cli fills a real small disk.)"""
    import errno

    reserved = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: reserved.append(size) or real(fd, offset, size))
    cache = TeacherCache(tmp_path / "fits", 8, 1)
    cache.store(torch.arange(8), [(torch.zeros(8, 3), torch.zeros(8, 5))])
    assert sorted(reserved) == sorted(os.path.getsize(p) for p in (tmp_path / "fits").glob("*.npy"))  # 3 files

    def no_room(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(OSError, match="No space left on device") as full:
        TeacherCache(tmp_path / "full", 8, 1)
    assert full.value.filename == str(tmp_path / "full" / "filled.npy")

    def unsupported(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    sparse = TeacherCache(tmp_path / "sparse", 8, 1)
    sparse.store(torch.arange(8), [(torch.ones(8, 3), torch.ones(8, 5))])
    assert not sparse.missing(torch.arange(8)).any()

    monkeypatch.setattr(os, "posix_fallocate", real)
    (tmp_path / "fits" / "logits_0.npy").unlink()
    with caplog.at_level("WARNING"):
        assert TeacherCache(tmp_path / "fits", 8, 1).cached == 0
    assert "outputs missing for rows marked filled" in caplog.text


def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_weights(data, teachers, tmp_path):
    """A loss gone to NaN or infinity (here an absurd rate) stops distillation; it never ships NaN weights as a
    student, which the export then blamed on ONNX."""
    with pytest.raises(EdgekdError, match="distillation diverged: the loss is (nan|inf)"):
        distill(teachers[:1], "test_resnet", data, replace(QUICK, lr=1e12, epochs=0.5), tmp_path / "out")
    assert not (tmp_path / "out" / "student.safetensors").exists()


def test_a_training_state_cut_short_starts_over_instead_of_failing(tmp_path: Path, caplog):
    """A state file a crash left half written (or a disk filled) is not a traceback on every re-run: the training
    starts over, and says why."""
    from edgekd.record import TrainState, resume_training_state, save_training_state

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "distill_state.pt"
    save_training_state(path, "key", TrainState(step=7), model, optimizer, scheduler)
    assert resume_training_state(path, "key", model, optimizer, scheduler).step == 7
    path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level("WARNING"):
        state = resume_training_state(path, "key", model, optimizer, scheduler)
    assert state.step == 0 and "cannot be read" in caplog.text and "starting over" in caplog.text
