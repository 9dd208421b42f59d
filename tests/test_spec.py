"""The job spec: loading, path resolution and every field's validation (pure logic, no Ray)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from controller.config import ControllerConfig
from dreambooth.errors import InputError
from dreambooth.model_files import check_base_model, content_identity
from trainer.checkpoint import CHECKPOINT_FORMAT, STATE_FILE, checkpoint_dir_name
from trainer.deepspeed_setup import deepspeed_config, lr_scheduler
from trainer.events import EventLog
from trainer.preflight import preflight
from trainer.run import check_rerun, photo_hashes
from trainer.spec import JobSpec
from trainer.storage import job_paths

VALID = {
    "base_model": "/models/sd15",
    "instance_images": ["/data/dog"],
    "instance_prompt": "a photo of sks dog",
    "class_prompt": "a photo of dog",
}


def test_defaults_are_a_valid_dreambooth_job():
    spec = JobSpec.from_dict(VALID)
    assert spec.with_prior_preservation and spec.precision == "fp16" and spec.zero_stage == 2
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_yaml_and_json_load_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "base_model: models/tiny\ninstance_images: photos\ninstance_prompt: a photo of sks dog\n"
        "class_prompt: a photo of dog\nmax_steps: 10\nprecision: bf16\ngpus_per_worker: 0\n"
        "learning_rate: 5e-6\n"  # a number, though YAML 1.1 (PyYAML's) wants 5.0e-6
    )
    spec = JobSpec.load(tmp_path / "job.yaml")
    assert spec.learning_rate == 5e-6
    assert spec.base_model == str(tmp_path / "models" / "tiny")
    assert spec.instance_images == [str(tmp_path / "photos")]
    assert spec.max_steps == 10
    (tmp_path / "job.json").write_text(json.dumps(spec.to_dict()))
    assert JobSpec.load(tmp_path / "job.json") == spec


def test_a_spec_file_means_what_it_says(tmp_path):
    """YAML 1.1 (PyYAML's) read `max_steps: 0400` as octal, 256 steps; and YAML and JSON kept the last of a key given
    twice, both without a word."""
    written = "base_model: /m\ninstance_images: /p\ninstance_prompt: a photo of sks dog\nclass_prompt: a photo of dog\n"
    (tmp_path / "job.yaml").write_text(written + "max_steps: 0400\ncheckpoint_interval: 0100\nseed: 0o17\n")
    spec = JobSpec.load(tmp_path / "job.yaml")
    assert (spec.max_steps, spec.checkpoint_interval, spec.seed) == (400, 100, 15)  # as YAML 1.2 reads them
    (tmp_path / "job.yaml").write_text(written + "max_steps: 400\nmax_steps: 4000\n")
    with pytest.raises(InputError, match=r"duplicate key 'max_steps' \(first at line 5\)\n.*line 6") as error:
        JobSpec.load(tmp_path / "job.yaml")
    assert error.value.field == "spec"
    (tmp_path / "job.json").write_text('{"base_model": "/m", "max_steps": 400, "max_steps": 4000}')
    with pytest.raises(InputError, match="is not valid json: duplicate key 'max_steps'"):
        JobSpec.load(tmp_path / "job.json")
    # The controller's config is read by the same loader.
    (tmp_path / "controller.yaml").write_text("storage: /a\nstorage: /b\n")
    with pytest.raises(InputError, match="duplicate key 'storage'"):
        ControllerConfig.load(tmp_path / "controller.yaml")


@pytest.mark.parametrize(
    "name, text",
    [
        ("job.json", '{"seed": ' + "9" * 5000 + "}"),  # past the 4300 digits Python reads
        ("job.yaml", "seed: " + "9" * 5000),
        ("job.yaml", "resolution: 0x" + "f" * 4000),  # read, but no message could print it
        ("job.yaml", "instance_prompt: 2024-13-01"),  # a date with no 13th month
        ("job.json", "[" * 100_000),
        ("job.yaml", "[" * 100_000),
    ],
)
def test_a_spec_file_past_what_python_reads_is_refused_as_invalid(tmp_path, name, text):
    """Tracebacks from `dreambooth train` (ValueError, RecursionError) before; the controller's config the same."""
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=f"is not valid {name.split('.')[1]}") as error:
        JobSpec.load(tmp_path / name)
    assert error.value.field == "spec"
    if name.endswith(".yaml"):
        with pytest.raises(InputError, match="is not YAML"):
            ControllerConfig.load(tmp_path / name)


def test_a_huge_wrong_value_is_named_in_a_short_message(tmp_path):
    """YAML aliases build a list of a million strings out of 400 bytes (a billion with 3 levels more: its full repr
    in the message took 42 s, then ran out of memory)."""
    levels = ["  - &a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    (tmp_path / "job.yaml").write_text(
        "base_model: /m\ninstance_images: /p\ninstance_prompt: a photo of sks dog\nclass_prompt: a photo of dog\n"
        "validation_prompts:\n" + "\n".join(levels) + "\n"
    )
    with pytest.raises(InputError, match=r"must be a list of strings, got \[\['x', 'x',") as error:
        JobSpec.load(tmp_path / "job.yaml")
    assert error.value.field == "validation_prompts" and len(error.value.message) < 500


@pytest.mark.parametrize(
    "change, field, says",
    [
        ({"resolution": 100}, "resolution", "multiple of 8"),
        ({"base_model": "../" * 2000}, "base_model", "a path of 6000 characters; at most 4096"),
        ({"instance_images": ["a.png", "x" * 5000]}, "instance_images", "at most 4096"),
        ({"resolution": 4096}, "resolution", "between 64 and 2048"),
        ({"max_steps": 0}, "max_steps", "[1, 1000000]"),
        ({"max_steps": True}, "max_steps", "must be an integer"),
        ({"learning_rate": -1e-5}, "learning_rate", "(0, 0.01]"),
        ({"learning_rate": 1.0}, "learning_rate", "(0, 0.01]"),
        ({"learning_rate": "fast"}, "learning_rate", "must be a number"),
        ({"batch_size": 0}, "batch_size", "[1, 256]"),
        ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps", "[1, 1024]"),
        ({"zero_stage": 1}, "zero_stage", "2 or 3"),
        ({"precision": "fp8"}, "precision", "one of ['fp16', 'bf16', 'fp32']"),
        ({"precision": "fp16", "gpus_per_worker": 0}, "precision", "DeepSpeed refuses fp16 on CPUs"),
        ({"offload_params": True}, "offload_params", "zero_stage 3"),
        ({"lr_schedule": "exponential"}, "lr_schedule", "one of"),
        ({"lr_warmup_steps": 500, "max_steps": 100}, "lr_warmup_steps", "[0, max_steps]"),
        ({"instance_prompt": "a photo of a dog"}, "instance_prompt", "must contain the identifier 'sks'"),
        ({"instance_prompt": "a photo of sksdog"}, "instance_prompt", "as a word"),
        ({"identifier": "two words"}, "identifier", "one alphanumeric word"),
        ({"class_prompt": ""}, "class_prompt", "required for prior preservation"),
        ({"class_prompt": "a photo of sks dog"}, "class_prompt", "without the identifier"),
        ({"num_class_images": -1}, "num_class_images", ">= 0"),
        ({"num_class_images": 10**9}, "num_class_images", "at most 10000"),  # the driver would list a billion files
        ({"validation_prompts": ["a photo of sks dog"] * 33}, "validation_prompts", "at most 32"),
        ({"instance_prompt": "a photo of sks dog" + " x" * 1000}, "instance_prompt", "at most 2000"),
        ({"class_prompt": "a photo of a dog" + "!" * 2000}, "class_prompt", "at most 2000"),
        ({"validation_prompts": ["sks dog", "sks" * 700]}, "validation_prompts", "at most 2000"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm", "> 0"),
        ({"prior_loss_weight": -1.0}, "prior_loss_weight", "[0, 100]"),
        ({"instance_images": []}, "instance_images", "at least one"),
        ({"instance_images": [3]}, "instance_images", "list of strings"),
        ({"num_workers": 0}, "num_workers", "[1, 1024]"),
        ({"cpus_per_worker": 1e-300}, "cpus_per_worker", "[0.0001, 256]"),
        ({"gpus_per_worker": 1e-9}, "gpus_per_worker", "0 (CPUs) or at least 0.0001"),
        ({"gpus_per_worker": 2.0}, "gpus_per_worker", "a worker trains on one GPU"),
        ({"gpus_per_worker": 0.5, "num_workers": 2}, "gpus_per_worker", "two ranks on one GPU"),
        ({"class_prompt": "a photo of sks, a dog"}, "class_prompt", "without the identifier 'sks'"),
        # CLIP's tokenizer lowercases: "Sks" is the identifier's token.
        ({"class_prompt": "a photo of a Sks dog"}, "class_prompt", "without the identifier 'sks'"),
        # CLIP splits letters from digits and underscores: these are its tokens too.
        ({"class_prompt": "a photo of a sks_style dog"}, "class_prompt", "without the identifier 'sks'"),
        ({"class_prompt": "a photo of 2sks dogs"}, "class_prompt", "without the identifier 'sks'"),
        ({"prior_loss_weight": 0.0}, "prior_loss_weight", "set num_class_images to 0 instead"),
        ({"checkpoint_interval": 0}, "checkpoint_interval", ">= 1"),
        ({"torch_compile": True, "zero_stage": 3}, "torch_compile", "does not combine with zero_stage 3"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"learning_rte": 1e-5}, "learning_rte", "did you mean 'learning_rate'?"),
    ],
)
def test_nonsense_is_refused_with_the_field_and_what_to_fix(change, field, says):
    with pytest.raises(InputError) as error:
        JobSpec.from_dict({**VALID, **change}).validate_new()
    assert error.value.field == field
    assert says in error.value.message


@pytest.mark.parametrize(
    "change",
    [
        {"base_model": "/m" + "/x" * 3000},
        {"class_prompt": "a photo of a dog" + "!" * 2000},
        {"num_class_images": 20000},
        {"validation_prompts": ["a photo of sks dog"] * 33},
        {"class_prompt": "a photo of a Sks dog"},
        {"prior_loss_weight": 0.0},
        {"torch_compile": True, "zero_stage": 3},
        {"gpus_per_worker": 2.0},
        {"validation_interval": 100},
    ],
)
def test_a_stored_spec_an_older_release_took_reads_back(change):
    """Checks added since a release refuse new specs only: the trainer and the controller read a stored spec back
    with validate, at every start of its job, and a job queued or trained part-way before the upgrade must run."""
    spec = JobSpec.from_dict({**VALID, **change})
    with pytest.raises(InputError):
        spec.validate_new()


def test_a_rerun_is_refused_only_what_changed_since_its_job_ran():
    """A rerun's spec may keep what an older release took (its job ran with it), not make anything new of it."""
    stored = {**VALID, "prior_loss_weight": 0.0, "validation_interval": 5, "validation_prompts": ["sks dog"]}
    ran_with = JobSpec.from_dict(stored).to_dict()
    JobSpec.from_dict({**stored, "max_steps": 800}).validate_new(ran_with=ran_with)
    for change, field in [
        ({"validation_prompts": []}, "validation_interval"),  # a check's other field changed: checked again
        ({"num_class_images": 20000}, "num_class_images"),
        ({"prior_loss_weight": 0.0, "class_prompt": "a Sks dog"}, "class_prompt"),
    ]:
        with pytest.raises(InputError) as error:
            JobSpec.from_dict({**stored, **change}).validate_new(ran_with=ran_with)
        assert error.value.field == field


def test_required_fields_and_shape():
    with pytest.raises(InputError, match="required field"):
        JobSpec.from_dict({"base_model": "/m"})
    with pytest.raises(InputError, match="mapping"):
        JobSpec.from_dict(["not", "a", "mapping"])


def test_prior_preservation_off_needs_no_class_prompt():
    spec = JobSpec.from_dict({**VALID, "class_prompt": "", "num_class_images": 0})
    assert not spec.with_prior_preservation


def test_deepspeed_config_follows_the_spec():
    spec = JobSpec.from_dict(
        {
            **VALID,
            "zero_stage": 3,
            "offload_optimizer": True,
            "offload_params": True,
            "batch_size": 2,
            "gradient_accumulation_steps": 4,
        }
    )
    config = deepspeed_config(spec, world_size=8)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_batch_size"] == 2 * 4 * 8
    assert config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    assert config["optimizer"]["type"] == "AdamW"  # offload needs DeepSpeed's CPU Adam
    cpu = JobSpec.from_dict({**VALID, "precision": "bf16", "gpus_per_worker": 0})
    config = deepspeed_config(cpu, world_size=2)
    assert config["bf16"]["enabled"] and "optimizer" not in config


def test_deepspeed_config_holds_no_device_sync_a_step_does_not_need():
    """On a GPU each of these waits for the device, so the host cannot queue the next step meanwhile: DeepSpeed's
    throughput timer (twice a micro-step), and overlap_comm's end-of-backward sync, which only several ranks need."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.config import get_timers_config

    spec = JobSpec.from_dict(VALID)
    alone, together = deepspeed_config(spec, world_size=1), deepspeed_config(spec, world_size=2)
    assert not get_timers_config(alone).enabled  # as DeepSpeed reads it
    assert not DeepSpeedZeroConfig(**alone["zero_optimization"]).overlap_comm
    assert DeepSpeedZeroConfig(**together["zero_optimization"]).overlap_comm
    # ZeRO-3 fetches parameters on overlap_comm's stream: without it, each fetch waits for the compute stream.
    zero3 = deepspeed_config(dataclasses.replace(spec, zero_stage=3), world_size=1)
    assert DeepSpeedZeroConfig(**zero3["zero_optimization"]).overlap_comm
    # Replayed as CUDA graphs, the UNet's gradients all come at its backward's end: a reduction overlapping the text
    # encoder's replay would race with it, for next to no overlap.
    graphs = dataclasses.replace(spec, torch_compile=True, train_text_encoder=True, gpus_per_worker=1)
    assert graphs.replays_cuda_graphs
    assert not DeepSpeedZeroConfig(**deepspeed_config(graphs, world_size=2)["zero_optimization"]).overlap_comm
    launched = dataclasses.replace(graphs, cuda_graphs=False)
    assert DeepSpeedZeroConfig(**deepspeed_config(launched, world_size=2)["zero_optimization"]).overlap_comm


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_every_schedule_warms_up(schedule):
    spec = JobSpec.from_dict({**VALID, "lr_schedule": schedule, "lr_warmup_steps": 4, "max_steps": 8})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.learning_rate)
    schedule_ = lr_scheduler(spec, optimizer)
    rates = []
    for _ in range(5):
        rates.append(schedule_.get_last_lr()[0])
        optimizer.step()
        schedule_.step()
    assert rates == pytest.approx([0, 1.25e-6, 2.5e-6, 3.75e-6, 5e-6])


def committed_checkpoint_at(paths, step: int) -> None:
    """A checkpoint directory, and the event that says Ray committed it."""
    directory = paths.checkpoints_dir / checkpoint_dir_name(step)
    directory.mkdir(parents=True)
    EventLog(paths.events_file).emit("checkpoint", step=step, path=str(directory))


def test_a_rerun_may_not_train_longer_on_a_decaying_schedule(tmp_path):
    """A linear or cosine rate decays over max_steps; the checkpoint holds its position, not its length."""
    paths = job_paths(tmp_path, "dog")
    committed_checkpoint_at(paths, 6)
    for schedule, allowed in [("constant", True), ("linear", False), ("cosine", False)]:
        first = JobSpec.from_dict({**VALID, "max_steps": 10, "lr_schedule": schedule})
        paths.spec_file.write_text(json.dumps(first.to_dict()))
        longer = JobSpec.from_dict({**VALID, "max_steps": 20, "lr_schedule": schedule})
        if allowed:
            check_rerun(longer, paths)
        else:
            with pytest.raises(InputError) as error:
                check_rerun(longer, paths)
            assert error.value.field == "max_steps" and schedule in error.value.message
            check_rerun(first, paths)  # the same max_steps resumes


def test_a_rerun_may_change_what_trains_nothing(tmp_path):
    """Without prior preservation the class-image fields train nothing; one worker's GPU share only schedules."""
    paths = job_paths(tmp_path, "dog")
    committed_checkpoint_at(paths, 6)
    first = {**VALID, "num_class_images": 0, "gpus_per_worker": 0.5, "max_steps": 10}
    paths.spec_file.write_text(json.dumps(JobSpec.from_dict(first).to_dict()))
    check_rerun(
        JobSpec.from_dict({**first, "class_prompt": "a photo of a dog", "class_image_guidance_scale": 5}), paths
    )
    check_rerun(JobSpec.from_dict({**first, "gpus_per_worker": 1}), paths)
    for change, field in [
        ({"num_class_images": 50}, "num_class_images"),  # now the class images train
        ({"gpus_per_worker": 0, "precision": "bf16"}, "gpus_per_worker"),  # from a GPU to the CPU
        ({"gpus_per_worker": 1, "num_workers": 2}, "gpus_per_worker"),  # several workers: not one worker's share
    ]:
        with pytest.raises(InputError) as error:
            check_rerun(JobSpec.from_dict({**first, **change}), paths)
        assert error.value.field == field


def test_a_rerun_is_refused_when_the_photos_behind_its_paths_changed(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(photos / f"{i}.png")
    spec = JobSpec.from_dict({**VALID, "instance_images": [str(photos)]})
    paths = job_paths(tmp_path, "dog")
    committed_checkpoint_at(paths, 6)
    paths.spec_file.write_text(json.dumps(spec.to_dict()))
    paths.photos_file.write_text(json.dumps(photo_hashes(spec)))
    check_rerun(spec, paths)
    Image.new("RGB", (64, 64), (0, 90, 0)).save(photos / "2.png")  # the same folder, one photo more
    with pytest.raises(InputError) as error:
        check_rerun(spec, paths)
    assert error.value.field == "instance_images" and "other instance images" in error.value.message


def test_a_rerun_is_refused_when_another_model_is_at_its_base_models_path(tmp_path):
    """A base model replaced in place by another of the same architecture (same names and sizes): resumed, the old
    base's trained UNet was exported beside the new one's VAE and text encoder. A copy of the same model is the same."""
    model = tmp_path / "sd"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text('{"sample_size": 64}')
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(range(256)) * 20_000)  # past the samples read at each end
    spec = JobSpec.from_dict({**VALID, "base_model": str(model)})
    paths = job_paths(tmp_path, "dog")
    committed_checkpoint_at(paths, 6)
    paths.spec_file.write_text(json.dumps(spec.to_dict()))
    paths.base_model_file.write_text(json.dumps(content_identity(model)))
    check_rerun(spec, paths)
    shutil.copytree(model, tmp_path / "copy")  # other inodes and times, the same files
    assert content_identity(tmp_path / "copy") == content_identity(model)
    os.mkfifo(model / "unet" / "stray")  # not a weights file, and opening it plainly would wait for ever
    check_rerun(spec, paths)
    weights.write_bytes(bytes(reversed(range(256))) * 20_000)  # another fine-tune: the same size
    with pytest.raises(InputError) as error:
        check_rerun(spec, paths)
    assert error.value.field == "base_model" and "trained from another model" in error.value.message


def test_a_rerun_refuses_checkpoints_another_release_laid_out_otherwise(tmp_path):
    """Checkpoints of another layout (ZeRO-2's parameters flattened, say) fail to load at each of the run's retries
    and at the export: refused before any worker starts, with what to do. Those written before formats were stamped
    are tried as before."""
    paths = job_paths(tmp_path, "dog")
    spec = JobSpec.from_dict(VALID)
    committed_checkpoint_at(paths, 6)
    paths.spec_file.write_text(json.dumps(spec.to_dict()))
    state = paths.checkpoints_dir / checkpoint_dir_name(6) / STATE_FILE
    for stamp in [{}, {"format": CHECKPOINT_FORMAT}]:
        state.write_text(json.dumps({"step": 6, "loss": 0.1, **stamp}))
        check_rerun(spec, paths)
    state.write_text(json.dumps({"step": 6, "loss": 0.1, "format": CHECKPOINT_FORMAT + 1}))
    with pytest.raises(InputError, match="written by another release") as error:
        check_rerun(spec, paths)
    assert error.value.field == "checkpoints" and "--job-id" in error.value.message


def test_a_rerun_resumes_only_what_its_checkpoints_were_trained_with(tmp_path):
    paths = job_paths(tmp_path, "dog")
    first = JobSpec.from_dict({**VALID, "max_steps": 10})
    check_rerun(first, paths)  # nothing there yet
    paths.job_dir.mkdir(parents=True)
    paths.spec_file.write_text(json.dumps(first.to_dict()))
    check_rerun(JobSpec.from_dict({**VALID, "learning_rate": 1e-6}), paths)  # no checkpoint: starts over anyway
    (paths.checkpoints_dir / checkpoint_dir_name(8)).mkdir(parents=True)  # a save cut short: never committed
    check_rerun(JobSpec.from_dict({**VALID, "learning_rate": 1e-6, "max_steps": 7}), paths)  # starts over too
    committed_checkpoint_at(paths, 6)

    check_rerun(JobSpec.from_dict({**VALID, "max_steps": 20, "validation_prompts": ["sks dog, snow"]}), paths)
    older = {k: v for k, v in first.to_dict().items() if k != "prior_loss_weight"}  # a field a later version added
    paths.spec_file.write_text(json.dumps(older))
    check_rerun(first, paths)
    paths.spec_file.write_text(json.dumps(first.to_dict()))
    for change, field in [
        ({"learning_rate": 1e-6}, "learning_rate"),
        ({"instance_prompt": "a photo of sks cat", "class_prompt": "a photo of cat"}, "class_prompt"),
        ({"max_steps": 5}, "max_steps"),  # below the checkpoint at step 6
    ]:
        with pytest.raises(InputError) as error:
            check_rerun(JobSpec.from_dict({**VALID, "max_steps": 10, **change}), paths)
        assert error.value.field == field and "another job id (--job-id)" in error.value.message


def test_what_would_train_or_draw_other_than_asked_is_refused(tiny_model, dog_images, tmp_path):
    """A guidance-distilled UNet (LCM's): diffusers' pipeline embeds its guidance scale, training and serving guide
    it, so served images were not the validation grids'. A validation interval without prompts drew nothing, silently:
    refused for a new spec (validate_new), not when a stored one is read back or its job started again."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    spec = JobSpec.from_dict(VALID | {"base_model": str(model), "instance_images": [str(dog_images)], "resolution": 64})
    unet = model / "unet" / "config.json"
    unet.write_text(json.dumps(json.loads(unet.read_text()) | {"time_cond_proj_dim": 32}))
    with pytest.raises(InputError, match="takes the guidance scale as an input") as error:
        preflight(spec)
    assert error.value.field == "base_model"
    check_base_model(model)  # what serving loads models with: those exported before the check still serve
    shutil.copy(tiny_model / "unet" / "config.json", unet)
    silent = dataclasses.replace(spec, validation_interval=100)
    silent.validate()  # a stored spec reads back
    preflight(silent)  # its job starts again
    with pytest.raises(InputError, match="there are none: add some") as error:
        silent.validate_new()
    assert error.value.field == "validation_interval"


def test_preflight_refuses_a_unet_predicting_what_training_has_no_target_for(tiny_model, dog_images, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    config = model / "scheduler" / "scheduler_config.json"
    fields = {"base_model": str(model), "instance_images": [str(dog_images)], "resolution": 64}
    spec = JobSpec.from_dict(VALID | fields)
    for kind in ("epsilon", "v_prediction", "sample"):
        config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": kind}))
        if kind == "sample":  # the UNet predicts the clean image: the loss would train it to predict the noise
            with pytest.raises(InputError, match="prediction_type is 'sample'") as error:
                preflight(spec)
            assert error.value.field == "base_model"
        else:
            preflight(spec)


def test_preflight_refuses_sampling_steps_the_base_models_scheduler_cannot_take(tiny_model, dog_images, tmp_path):
    """SD 1.5's schedule (steps_offset 1, as the tiny model's) at 1000 steps starts at timestep 1000 of 0..999: the
    job failed after training, at its final validation grid, or in every class-image actor."""
    fields = {"base_model": str(tiny_model), "instance_images": [str(dog_images)], "resolution": 64}
    sampling = {"validation_prompts": ["a photo of sks dog"], "num_class_images": 4}
    for field in ("validation_inference_steps", "class_image_inference_steps"):
        with pytest.raises(InputError, match=r"cannot sample 1000 steps \(IndexError") as error:
            preflight(JobSpec.from_dict(VALID | fields | sampling | {field: 1000}))
        assert error.value.field == field
        preflight(JobSpec.from_dict(VALID | fields | sampling | {field: 999}))
    # A config with steps_offset 0 samples with 1 all the same: the pipeline sets it so.
    model = shutil.copytree(tiny_model, tmp_path / "offset-0")
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"steps_offset": 0}))
    with pytest.raises(InputError, match="cannot sample 1000 steps"):
        offset_0 = {"base_model": str(model), "validation_inference_steps": 1000}
        preflight(JobSpec.from_dict(VALID | fields | sampling | offset_0))
    # Steps the job never samples with are not its scheduler's business.
    preflight(
        JobSpec.from_dict(
            VALID
            | fields
            | {"validation_inference_steps": 1000, "class_image_inference_steps": 1000, "num_class_images": 0}
        )
    )


def test_preflight_refuses_a_prompt_the_text_encoder_would_cut(tiny_model, dog_images, tmp_path):
    """CLIP reads 77 tokens: the identifier at the end of a long style prefix never reached the model, and the job
    succeeded with a model that ignores it."""
    prefix = "a highly detailed professional photograph, " * 14  # 84 tokens
    fields = {"base_model": str(tiny_model), "instance_images": [str(dog_images)], "resolution": 64}
    for change, field in [
        ({"instance_prompt": prefix + "of sks dog"}, "instance_prompt"),
        ({"class_prompt": prefix + "of a dog"}, "class_prompt"),
        ({"validation_prompts": ["sks dog", prefix + "of sks dog"]}, "validation_prompts"),
    ]:
        with pytest.raises(InputError, match=r"\d+ tokens; at most 77") as error:
            preflight(JobSpec.from_dict(VALID | fields | change))
        assert error.value.field == field
    # A tokenizer that cannot be loaded is the base model's fault, named so (transformers raises KeyError for some).
    broken = shutil.copytree(tiny_model, tmp_path / "broken-tokenizer")
    (broken / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="its tokenizer cannot be loaded") as error:
        preflight(JobSpec.from_dict(VALID | fields | {"base_model": str(broken)}))
    assert error.value.field == "base_model"
    # Without prior preservation the class prompt is never encoded; a prompt of 77 tokens fits.
    preflight(JobSpec.from_dict(VALID | fields | {"class_prompt": prefix, "num_class_images": 0}))
    preflight(JobSpec.from_dict(VALID | fields | {"instance_prompt": "sks " * 75}))
