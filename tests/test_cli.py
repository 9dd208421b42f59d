"""`dreambooth train` refuses bad input in about a second, before Ray or any worker starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dreambooth.cli import main
from dreambooth.errors import InputError
from dreambooth.tiny_model import SEED_FILE
from tests.conftest import partly_down_stack
from trainer.checkpoint import STATE_FILE, checkpoint_dir_name
from trainer.events import EventLog
from trainer.spec import JobSpec
from trainer.storage import job_paths


@pytest.fixture
def job(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 72), (40 * i, 100, 200)).save(photos / f"{i}.jpg")
    spec = {
        "base_model": str(tiny_model),
        "instance_images": ["photos"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "resolution": 64,
        "precision": "fp32",
        "gpus_per_worker": 0,
    }

    def write(**changes):
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({**spec, **changes}))
        return path

    return write, tmp_path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_image_file_is_named(job, capsys):
    write, tmp = job
    code, err = run_cli(
        capsys, "train", str(write(instance_images=["photos/0.jpg", "photos/nope.jpg"])), "--storage", str(tmp / "s")
    )
    assert code == 2 and "instance_images" in err and "nope.jpg" in err
    assert not (tmp / "s").exists()  # refused before anything was made: no storage, no job, no Ray


def test_corrupt_and_too_small_images_are_all_reported(job, capsys):
    write, tmp = job
    (tmp / "photos" / "1.jpg").write_bytes((tmp / "photos" / "1.jpg").read_bytes()[:200])
    Image.new("RGB", (40, 40)).save(tmp / "photos" / "small.png")
    code, err = run_cli(capsys, "train", str(write()), "--storage", str(tmp / "s"))
    assert code == 2
    assert "1.jpg" in err and "corrupt" in err
    assert "small.png" in err and "40x40" in err


def test_base_model_missing_a_component(job, capsys, tiny_model):
    write, tmp = job
    broken = tmp / "broken-model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    code, err = run_cli(capsys, "train", str(write(base_model=str(broken))), "--storage", str(tmp / "s"))
    assert code == 2 and "base_model" in err and "vae" in err


def test_bad_hyperparameters(job, capsys):
    write, tmp = job
    code, err = run_cli(capsys, "train", str(write(resolution=100)), "--storage", str(tmp / "s"))
    assert code == 2 and "resolution" in err and "multiple of 8" in err
    code, err = run_cli(capsys, "train", str(write(learning_rate=-1)), "--storage", str(tmp / "s"))
    assert code == 2 and "learning_rate" in err
    code, err = run_cli(capsys, "train", str(tmp / "missing.yaml"), "--storage", str(tmp / "s"))
    assert code == 2 and "cannot read" in err


def test_a_rerun_reads_its_spec_as_stored_a_new_job_as_new(job, capsys, monkeypatch):
    """A check added since a release refuses new specs only: the rerun of a job an older release started (its spec
    stored in the job's folder), which its checkpoints tie to that spec, must start."""
    write, tmp = job
    spec = write(prior_loss_weight=0.0)  # refused since 63f735d: the class images would be trained on for nothing
    code, err = run_cli(capsys, "train", str(spec), "--storage", str(tmp / "s"), "--job-id", "dog-1")
    assert code == 2 and "prior_loss_weight" in err
    paths = job_paths(tmp / "s", "dog-1")
    paths.job_dir.mkdir(parents=True)
    paths.spec_file.write_text(json.dumps(JobSpec.load(spec).to_dict()))

    def preflight_reached(_spec) -> None:
        raise InputError("preflight", "reached")

    monkeypatch.setattr("trainer.preflight.preflight", preflight_reached)
    code, err = run_cli(capsys, "train", str(spec), "--storage", str(tmp / "s"), "--job-id", "dog-1")
    assert (code, err) == (2, "error: preflight: reached\n")
    longer = write(prior_loss_weight=0.0, max_steps=800)  # what a rerun may change: checked as before
    code, err = run_cli(capsys, "train", str(longer), "--storage", str(tmp / "s"), "--job-id", "dog-1")
    assert (code, err) == (2, "error: preflight: reached\n")
    # What changed since is checked as new: the identifier in the class prompt would leak into the prior.
    leaking = write(prior_loss_weight=0.0, class_prompt="a photo of sks dog")
    code, err = run_cli(capsys, "train", str(leaking), "--storage", str(tmp / "s"), "--job-id", "dog-1")
    assert code == 2 and "class_prompt" in err and "without the identifier" in err


def test_a_job_id_made_from_the_spec_files_name_says_so(job, capsys):
    """`train "my job.yaml"` blamed a job id the user never gave, without saying where it came from or how to set it."""
    write, tmp = job
    spec = write().rename(tmp / "my job.yaml")
    code, err = run_cli(capsys, "train", str(spec), "--storage", str(tmp / "s"))
    rule = "use 1-128 letters, digits, '_', '.' or '-', starting alphanumeric"
    assert (code, err) == (2, f"error: job_id: 'my job': {rule} (taken from the spec's file name: give --job-id ID)\n")
    code, err = run_cli(capsys, "train", str(spec), "--storage", str(tmp / "s"), "--job-id", "my job")
    assert (code, err) == (2, f"error: job_id: 'my job': {rule}\n")  # given: the user's own
    assert not (tmp / "s").exists()


def test_a_job_for_gpus_on_a_machine_without_is_refused_not_left_waiting(job):
    """The README's example spec asks for a GPU: on a laptop, Ray would hold the job for ever without a word."""
    import subprocess
    import sys

    write, tmp = job
    spec = write(gpus_per_worker=1)
    # A process of its own: the command starts a private Ray, and this one is connected to the tests' cluster.
    command = [sys.executable, "-m", "dreambooth.cli", "train", str(spec), "--storage", str(tmp / "s")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: gpus_per_worker: the job needs 1 GPU (num_workers x gpus_per_worker)" in result.stderr
    assert "gpus_per_worker: 0 trains on CPUs" in result.stderr
    # A job that trained to the end elsewhere has only its export left, which runs on CPUs: not refused here.
    paths = job_paths(tmp / "s", "job-trained-elsewhere")
    final = paths.checkpoints_dir / checkpoint_dir_name(400)
    final.mkdir(parents=True)
    (final / STATE_FILE).write_text(json.dumps({"step": 400}))  # no weights: the export fails, after the check
    EventLog(paths.events_file).emit("checkpoint", step=400, path=str(final))
    result = subprocess.run([*command, "--job-id", paths.job_id], capture_output=True, text=True, timeout=300)
    assert "the job needs 1 GPU" not in result.stderr and "[EXPORTING]" in result.stderr, result.stderr[-3000:]


def test_ctrl_c_in_train_says_the_job_stopped_and_how_to_resume_it(job, monkeypatch, capsys):
    """Ray Train's fit answers SIGINT with its own handler (the run aborted, then SystemExit 1): `train` exited 1
    without a word about the job, nor how to resume it."""
    from dreambooth import cli

    def interrupted(*args):
        raise SystemExit(1)  # what Ray Train's handler ends with

    monkeypatch.setattr(cli, "_run_with_progress", interrupted)
    write, tmp = job
    spec = write()
    assert main(["train", str(spec), "--storage", str(tmp / "s"), "--job-id", "dog-1"]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"interrupted: job dog-1 stopped; `dreambooth train {spec} --storage {tmp / 's'} --job-id dog-1` resumes it "
        "from its last checkpoint\n"
    )

    from trainer.run import RayLostTheRun

    def ray_lost(*args):
        raise RayLostTheRun("Ray lost the training run's processes: ActorDiedError: its owner died")

    monkeypatch.setattr(cli, "_run_with_progress", ray_lost)  # a node lost, not the job's fault: worth resuming
    assert main(["train", str(spec), "--storage", str(tmp / "s"), "--job-id", "dog-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Ray lost the training run's processes: ActorDiedError: its owner died; `dreambooth")
    assert err.endswith("--job-id dog-1` resumes it from its last checkpoint\n")


def test_train_keeps_stdout_for_its_result(capfd, monkeypatch):
    """DeepSpeed's and Ray's prints during training (its accelerator warning, the export's "Processing zero
    checkpoint") came before `model: ...` on stdout, which a script reads."""
    import os

    from dreambooth.cli import stdout_to_stderr

    with stdout_to_stderr():
        print("from Python")
        os.write(1, b"from C\n")  # as a library's own writes
    print("model: /m")
    out, err = capfd.readouterr()
    assert (out, err) == ("model: /m\n", "from Python\nfrom C\n")
    monkeypatch.setattr(sys, "stdout", None)  # started with stdout closed (`>&-`): training still runs
    with stdout_to_stderr():
        pass


def train_in_a_new_process(*args: str, then: str) -> subprocess.CompletedProcess:
    """`dreambooth train ARGS` in an interpreter of its own (none of the training libraries loaded yet), which then
    prints its exit code and `then` (an expression) as its last line."""
    probe = f"import sys\nfrom dreambooth.cli import main\ncode = main(['train', *{list(args)!r}])\nprint(code, {then})"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)


def test_bad_input_is_refused_before_the_training_libraries_load(job):
    """What `dreambooth train` checks first imports none of Ray, DeepSpeed or diffusers (seconds to load): a missing
    base model or photo is told in about a second."""
    write, tmp = job
    spec = write(base_model=str(tmp / "nowhere"))
    loaded = "sorted(m for m in ('ray', 'deepspeed', 'diffusers') if m in sys.modules)"
    result = train_in_a_new_process(str(spec), "--storage", str(tmp / "s"), then=loaded)
    assert result.stdout.split("\n")[-2] == "2 []", result.stdout + result.stderr[-2000:]
    assert "base_model" in result.stderr and "does not exist" in result.stderr


def checkpointed_with_another_learning_rate(paths, spec_file: Path) -> None:
    """The job of `paths` has a checkpoint, trained with the spec at `spec_file` but another learning rate."""
    checkpoint = paths.checkpoints_dir / checkpoint_dir_name(4)
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 4}))
    EventLog(paths.events_file).emit("checkpoint", step=4, path=str(checkpoint))
    paths.spec_file.write_text(json.dumps({**JobSpec.load(spec_file).to_dict(), "learning_rate": 1e-6}))


def test_a_rerun_changing_what_its_checkpoints_hold_is_refused_before_ray_starts(job):
    """check_rerun needs only the job's folder: it ran after a private Ray had started (tens of seconds), and the
    training libraries' import-time prints (DeepSpeed's accelerator line) reached stdout, which is the result's."""
    write, tmp = job
    spec = write()
    checkpointed_with_another_learning_rate(job_paths(tmp / "s", "dog-1"), spec)
    ray_started = "sys.modules['ray'].is_initialized()"
    result = train_in_a_new_process(str(spec), "--storage", str(tmp / "s"), "--job-id", "dog-1", then=ray_started)
    assert result.stdout == "2 False\n", result.stdout + result.stderr[-2000:]
    assert "checkpoints trained with other learning_rate" in result.stderr


def test_paths_given_with_a_tilde_are_the_home_folders(job, capsys, monkeypatch):
    """The shell leaves `--storage=~/x` alone: a folder named `~` was made in the working directory for it."""
    write, tmp = job
    monkeypatch.setenv("HOME", str(tmp))
    paths = job_paths(tmp / "s", "dog-1")
    checkpointed_with_another_learning_rate(paths, write())
    code, err = run_cli(capsys, "train", "~/job.yaml", "--storage=~/s", "--job-id", "dog-1")
    assert code == 2 and f"delete {paths.job_dir} to start over" in err  # found the job where ~ is
    with pytest.raises(SystemExit) as exited:  # a usage error, not pathlib's RuntimeError
        main(["train", "~nosuchuser-x/job.yaml"])
    assert exited.value.code == 2 and "no home folder of that user" in capsys.readouterr().err


def test_a_misspelt_option_gets_its_commands_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "job.yaml", "--storge", "x"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("usage: dreambooth train ")
    assert "dreambooth train: error: unrecognized arguments: --storge x" in err
    with pytest.raises(SystemExit):
        main(["up", "--serve-port", "abc"])
    assert "argument --serve-port: 'abc' is not a port number" in capsys.readouterr().err
    # 0 CPUs was read as none given: Ray had every CPU of the machine (the cluster launcher's head has --num-cpus=0).
    with pytest.raises(SystemExit):
        main(["up", "--num-cpus", "0"])
    assert "argument --num-cpus: 0: the stack needs at least 1 CPU" in capsys.readouterr().err


def test_tiny_model_command(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").exists()


def test_tiny_model_says_it_kept_the_model_already_there_and_refuses_another_seed_for_it(tmp_path, capsys):
    """`tiny-model OUT --seed 1` over seed 0's model printed OUT and exited 0, the weights seed 0's; over real
    weights it printed their path as if it had written it."""
    out = tmp_path / "m"
    assert main(["tiny-model", str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    unet = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["tiny-model", str(out), "--seed", "4"]) == 2
    assert capsys.readouterr().err == f"error: seed: {out} holds the tiny model of seed 3: remove it to write seed 4\n"
    assert main(["tiny-model", str(out)]) == 0  # no seed asked for: the model there does
    assert capsys.readouterr() == (f"{out}\n", f"kept the tiny model of seed 3 already in {out}\n")
    (out / SEED_FILE).unlink()  # real weights, or a tiny model written before seeds were recorded
    assert main(["tiny-model", str(out), "--seed", "4"]) == 0
    assert capsys.readouterr() == (
        f"{out}\n",
        f"kept the model already in {out}; its seed is not recorded and may not be 4\n",
    )
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet


def test_training_progress_renders_every_kind_of_event(tmp_path, capsys):
    """What `dreambooth train` prints while its job runs, from the job's events file."""
    import threading

    from dreambooth.cli import show_progress
    from trainer.events import EventLog

    events = EventLog(tmp_path / "events.jsonl")
    events.emit("state", state="PREPARING")
    events.emit("class_images", done=2, total=2)
    events.emit("state", state="TRAINING")
    events.emit("progress", step=1, total_steps=4, loss=0.5, lr=1e-5, eta_s=3.2)
    events.emit("compiled", step=1, seconds=12.34, graphs=2, cudagraph_skips=0)
    events.emit("compiled", step=3, seconds=5.0, graphs=2, cudagraph_skips=1)  # a resumed run's, say
    events.emit("checkpoint", step=2, path="/s/checkpoint_step_0000002", stall_s=0.1, waited_s=0.0)
    events.emit("checkpoint", step=4, path="/s/checkpoint_step_0000004", stall_s=14.0, waited_s=13.7)
    events.emit("state", state="FAILED", reason="INVALID_INPUT", message="resolution: too small")
    stop = threading.Event()
    stop.set()  # what is written is read, then it returns
    show_progress(tmp_path / "events.jsonl", stop)
    err = capsys.readouterr().err
    for line in (
        "[PREPARING]",
        "[TRAINING]",
        "torch.compile: first step 12.3 s (2 graphs)\n",
        "torch.compile: first step 5.0 s (2 graphs); 1 not replayed as CUDA graphs: slower steps (TORCH_LOGS",
        "checkpoint at step 2: /s/checkpoint_step_0000002\n",
        "checkpoint at step 4: /s/checkpoint_step_0000004 (training waited 13.7 s for the previous checkpoint to be",
        "[FAILED] resolution: too small",
    ):
        assert line in err
    assert "class images: 2/2 imgs\n" in err  # the two bars, as lines: stderr is no terminal here
    assert "training: 1/4 steps, loss 0.5000, eta 3s\n" in err  # as `watch` shows a job the controller runs
    assert "\r" not in err  # tqdm's frames went into a log as one line, as long as the job ran


def test_the_private_local_ray_asks_its_own_state_api():
    """`dreambooth train` without --address starts a private Ray. Its processes find the State API (Ray Train's
    placement-group cleaner asks it whether the run's controller lives) where the private Ray says, not through
    /tmp/ray's record of the last `ray start`: a dead cluster there held every fit() 12 s, another one answered."""
    import subprocess
    import sys

    probe = (
        "import ray\n"
        "from ray.dashboard.utils import get_address_for_submission_client as api\n"
        "from ray.util.state import list_nodes\n"
        "from dreambooth.local_ray import init_ray\n"
        "init_ray()\n"
        "url = ray.get(ray.remote(num_cpus=0)(lambda: api(None)).remote())\n"
        "print(url, [n.node_id for n in list_nodes(address=url)] == [ray.get_runtime_context().get_node_id()])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    url, its_own = result.stdout.split()
    assert url.startswith("http://127.0.0.1:") and its_own == "True", result.stdout


def test_demo_says_which_options_a_running_stack_does_not_honour(tmp_path, capsys):
    """`demo --storage /big/disk` with a stack already running in --dir trained on that stack's storage, and its ports
    and --num-cpus went the same way, without a word. (The stack here is a record whose one live process is this one:
    the demo then stops at its Ray, which does not answer, before any job.)"""
    running = partly_down_stack(tmp_path)
    closed = running.controller
    port, big = closed.rpartition(":")[2], tmp_path / "big-disk"
    code, err = run_cli(
        capsys,
        *("demo", "--out", str(tmp_path / "out"), "--dir", running.dir, "--storage", str(big)),
        *("--serve-port", "9000", "--controller-port", port, "--dashboard-port", "0", "--num-cpus", "2"),
    )
    down = f"; `dreambooth down --dir {running.dir}` first to start one with it"
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: --storage {big} is ignored: the running stack's storage is {running.storage}{down}",
        f"warning: --serve-port 9000 is ignored: the running stack's is {port}{down}",
        f"warning: --num-cpus 2 is ignored: the running stack's Ray keeps the CPUs it started with{down}",
    ]  # the ports it has (--controller-port its own, 0 any free one) are honoured
    assert code == 1 and "partly down" in err  # this record's Ray is not there
    code, err = run_cli(capsys, "demo", "--out", str(tmp_path / "out"), "--dir", running.dir)
    assert code == 1 and "warning: " not in err  # nothing asked of it
