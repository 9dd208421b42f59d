"""The tiny model builder and the base-model loader (no Ray, CPU, a few seconds)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers read it: nothing may be downloaded

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from dreambooth.errors import InputError
from dreambooth.model_files import check_base_model, fingerprint, weights_variant
from dreambooth.sd_model import BaseModel, load_base_model, load_pipeline
from dreambooth.tiny_model import build_tiny_model
from trainer.preflight import preflight
from trainer.spec import JobSpec

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    """A copy to break on purpose."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def test_tokenizer_uses_the_real_clip_vocabulary(tiny):
    tokenizer = load_base_model(tiny, components=("tokenizer",)).tokenizer
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    padded = tokenizer("sks", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD pads with <|endoftext|>


def test_build_is_deterministic(tiny, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in WEIGHT_FILES:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    other_seed = build_tiny_model(tmp_path / "seed1", seed=1)
    a, b = load_file(tiny / WEIGHT_FILES[0]), load_file(other_seed / WEIGHT_FILES[0])
    assert any(not torch.equal(a[key], b[key]) for key in a)


def test_writing_and_loading_a_model_draw_no_progress_bar_of_the_libraries(tmp_path, capfd):
    """transformers' bars for the text encoder's weights drew frames into the demo's, the export's and the replicas'
    logs."""
    from transformers.utils import logging as transformers_logging

    model = build_tiny_model(tmp_path / "model", seed=3)
    load_base_model(model, components=["text_encoder"])
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert transformers_logging.is_progress_bar_enabled()  # a library user's setting is left as it was
    from dreambooth.sd_model import _without_transformers_bars

    first, second = _without_transformers_bars(), _without_transformers_bars()  # a replica's loads at once
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not transformers_logging.is_progress_bar_enabled()  # the second load's bar stays off
    second.__exit__(None, None, None)
    assert transformers_logging.is_progress_bar_enabled()


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "model", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_build_is_idempotent(tiny):
    before = fingerprint(tiny)
    assert build_tiny_model(tiny) == tiny
    assert fingerprint(tiny) == before  # returned at once, nothing rewritten


def test_concurrent_builds_end_with_one_complete_model(tiny, tmp_path):
    out = tmp_path / "model"
    results, errors = [], []

    def build():
        try:
            results.append(build_tiny_model(out))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [out.resolve()] * 3
    check_base_model(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp dirs left behind
    for name in WEIGHT_FILES:
        assert (out / name).read_bytes() == (tiny / name).read_bytes(), name


def test_model_metadata_reads_what_any_version_wrote(tmp_path):
    """metadata.json is read by serving from models any version exported: missing fields take their defaults,
    fields of a later version are not read, and a file that is not a JSON object is refused."""
    from dreambooth.model_files import ModelMetadata

    assert ModelMetadata.read(tmp_path) == ModelMetadata()  # no file: a model exported by hand
    assert (ModelMetadata().resolution, ModelMetadata().text_encoder_trained) == (512, True)
    written = ModelMetadata(job_id="job-1", class_prompt="a photo of dog", hyperparameters={"resolution": 768})
    (tmp_path / "metadata.json").write_text(json.dumps({**written.to_dict(), "from_a_later_version": 1}))
    assert ModelMetadata.read(tmp_path) == written and written.resolution == 768
    (tmp_path / "metadata.json").write_text(json.dumps({"hyperparameters": None, "train_text_encoder": False}))
    assert ModelMetadata.read(tmp_path).resolution == 512
    (tmp_path / "metadata.json").write_text("[]")
    with pytest.raises(ValueError, match="not an object"):
        ModelMetadata.read(tmp_path)


def test_the_random_sd15_model_samples_as_sd15_does():
    """Its scheduler is SD 1.5's (runwayml/stable-diffusion-v1-5's scheduler_config.json), so that benchmarks count
    what serving SD 1.5 costs: PNDM's steps, not the tiny model's DDPM."""
    from dreambooth.tiny_model import _sd15_scheduler

    published = {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    scheduler = _sd15_scheduler()
    assert type(scheduler).__name__ == "PNDMScheduler"
    assert {key: scheduler.config[key] for key in published} == published


def test_build_refuses_to_overwrite_other_content(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path / "model")


def test_diffusers_loads_and_samples_it(tiny):
    pipe = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a photo of sks dog"] * 2,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(images) == 2
    assert all(isinstance(image, Image.Image) and image.size == (64, 64) for image in images)


def test_load_base_model_subset(tiny):
    model = load_base_model(tiny, dtype=torch.bfloat16, components=("unet", "scheduler"))
    assert isinstance(model, BaseModel)
    assert model.unet.dtype == torch.bfloat16
    assert model.vae is None and model.text_encoder is None and model.tokenizer is None
    assert model.noise_scheduler.config.num_train_timesteps == 1000
    assert model.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert model.noise_scheduler.config.prediction_type == "epsilon"

    with pytest.raises(ValueError, match="safety_checker"):
        load_base_model(tiny, components=("unet", "safety_checker"))


def test_load_base_model_all(tiny):
    model = load_base_model(tiny)
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert 2 ** (len(model.vae.config.block_out_channels) - 1) == 2  # VAE downscale factor
    ids = model.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    hidden = model.text_encoder(ids)[0]
    assert hidden.shape == (1, 77, 32)


def test_load_pipeline_with_overridden_modules(tiny):
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", local_files_only=True)
    vae = load_base_model(tiny, components=("vae",)).vae
    pipe = load_pipeline(tiny, unet=unet, vae=vae)
    assert pipe.unet is unet and pipe.vae is vae
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (64, 64)  # default size: unet sample_size x VAE factor


def test_a_pipeline_of_a_model_whose_index_names_components_it_lacks_loads_and_saves(tiny_copy, tmp_path):
    """A safety checker taken out of model_index.json by hand (null) or a component listed without its folder (an
    image_encoder) passed preflight, trained, and failed the job at the export (diffusers' from_pretrained reads
    every entry): the pipeline is made from the components training uses, and its export loads as any model."""
    index = tiny_copy / "model_index.json"
    entries = json.loads(index.read_text())
    index.write_text(
        json.dumps(
            entries | {"safety_checker": None, "image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}
        )
    )
    pipe = load_pipeline(tiny_copy)
    assert type(pipe.scheduler).__name__ == entries["scheduler"][1]  # the sampler the model's index names
    pipe.save_pretrained(tmp_path / "export", safe_serialization=True)  # as trainer/export.py writes a model
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True)
    image = exported("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (64, 64)


def test_fp16_variant_only_weights_load(tiny_copy):
    for name in WEIGHT_FILES:
        weights = tiny_copy / name
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    check_base_model(tiny_copy)
    model = load_base_model(tiny_copy, components=("unet", "vae", "text_encoder"))
    assert model.unet is not None and model.vae is not None and model.text_encoder is not None


def test_weight_files_cut_short_are_refused_from_their_headers(tiny_copy):
    """A copy that stopped part way: found at submission, not when every worker fails to load it hours later."""
    unet, vae = (
        tiny_copy / "unet/diffusion_pytorch_model.safetensors",
        tiny_copy / "vae/diffusion_pytorch_model.safetensors",
    )
    size = unet.stat().st_size
    with open(unet, "r+b") as f:
        f.truncate(size - 1)
    vae.write_bytes(b"\x00" * 4)
    # A clone without Git LFS: each weights file is a pointer of a few lines.
    text_encoder = tiny_copy / "text_encoder/model.safetensors"
    text_encoder.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 492265168\n")
    with pytest.raises(InputError, match="weight files that cannot be loaded") as error:
        check_base_model(tiny_copy)
    assert error.value.field == "base_model"
    assert f"unet/diffusion_pytorch_model.safetensors ({size - 1} of {size} bytes)" in error.value.message
    assert "vae/diffusion_pytorch_model.safetensors (not a safetensors file)" in error.value.message
    assert "text_encoder/model.safetensors (a Git LFS pointer: run `git lfs pull`" in error.value.message


def test_a_variants_shard_cut_short_is_refused_too(tiny_copy):
    """fp16-only weights in shards, as diffusers names them (`diffusion_pytorch_model.fp16-00002-of-00003...`): a
    shard left a Git LFS pointer passed the check and failed every worker's load."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_copy / "unet")
    shutil.rmtree(tiny_copy / "unet")
    unet.save_pretrained(tiny_copy / "unet", variant="fp16", max_shard_size="2MB")
    shards = sorted((tiny_copy / "unet").glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))
    assert len(shards) > 1
    check_base_model(tiny_copy)
    shards[1].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4922651\n")
    with pytest.raises(InputError, match=f"unet/{shards[1].name} \\(a Git LFS pointer"):
        check_base_model(tiny_copy)


def test_bin_weights_cut_short_or_left_git_lfs_pointers_are_refused(tiny_copy):
    """A model with .bin weights only (an older save) cloned without Git LFS, or copied part way, passed the check and
    failed every worker's load. torch.save's zip is checked by its directory, at its end; a legacy (pickle) .bin is
    left to the load, and .bin files beside safetensors ones are not read (`git lfs pull -I "*.safetensors"`)."""
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 3438167536\n"
    (tiny_copy / "unet/diffusion_pytorch_model.bin").write_text(pointer)
    check_base_model(tiny_copy)
    for name in WEIGHT_FILES:
        weights = tiny_copy / name
        legacy = weights.parent.name == "text_encoder"
        to = weights.with_name("pytorch_model.bin" if legacy else "diffusion_pytorch_model.bin")
        torch.save(load_file(weights), to, _use_new_zipfile_serialization=not legacy)
        weights.unlink()
    check_base_model(tiny_copy)
    (tiny_copy / "unet/diffusion_pytorch_model.bin").write_text(pointer)
    vae = tiny_copy / "vae/diffusion_pytorch_model.bin"
    size = vae.stat().st_size
    with open(vae, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(InputError, match="weight files that cannot be loaded") as error:
        check_base_model(tiny_copy)
    assert "unet/diffusion_pytorch_model.bin (a Git LFS pointer: run `git lfs pull`" in error.value.message
    assert f"vae/diffusion_pytorch_model.bin (a torch.save zip cut short: {size // 2} bytes" in error.value.message
    assert "text_encoder" not in error.value.message


def test_a_sharded_model_missing_a_shard_its_index_names_is_refused(tiny_copy):
    """A sharded model copied without one of its shards passed the check (only the shards there were read) and
    failed every worker's load: each file the index's weight_map names must be there, and load, whatever its name."""
    unet = UNet2DConditionModel.from_pretrained(tiny_copy / "unet")
    shutil.rmtree(tiny_copy / "unet")
    unet.save_pretrained(tiny_copy / "unet", max_shard_size="1MB")
    folder = tiny_copy / "unet"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    entries = json.loads(index.read_text())
    shards = sorted(set(entries["weight_map"].values()))
    assert len(shards) > 2
    check_base_model(tiny_copy)
    (folder / shards[0]).unlink()
    (folder / shards[1]).rename(folder / "part-two.safetensors")  # a name of its own: found through the index only
    size = (folder / "part-two.safetensors").stat().st_size
    with open(folder / "part-two.safetensors", "r+b") as f:
        f.truncate(size - 1)
    entries["weight_map"] = {
        key: value.replace(shards[1], "part-two.safetensors") for key, value in entries["weight_map"].items()
    }
    index.write_text(json.dumps(entries))
    with pytest.raises(InputError, match="weight files that cannot be loaded") as error:
        check_base_model(tiny_copy)
    assert f"unet/{index.name} (names {shards[0]}, which is not there)" in error.value.message
    assert f"unet/part-two.safetensors ({size - 1} of {size} bytes)" in error.value.message


def test_fp16_shards_named_as_older_diffusers_did_load_as_the_fp16_variant(tiny_copy):
    """fp16-only copies saved by older diffusers name their shards with the variant last
    (`diffusion_pytorch_model-00001-of-00003.fp16.safetensors`): they were taken for default weights, so the load
    asked for those and found none."""
    unet = UNet2DConditionModel.from_pretrained(tiny_copy / "unet")
    shutil.rmtree(tiny_copy / "unet")
    unet.save_pretrained(tiny_copy / "unet", variant="fp16", max_shard_size="1MB")
    folder = tiny_copy / "unet"
    index = folder / "diffusion_pytorch_model.safetensors.index.fp16.json"
    entries = json.loads(index.read_text())
    older = {}
    for name in set(entries["weight_map"].values()):  # diffusion_pytorch_model.fp16-00001-of-00003.safetensors
        older[name] = name.replace(".fp16-", "-").replace(".safetensors", ".fp16.safetensors")
        (folder / name).rename(folder / older[name])
    entries["weight_map"] = {key: older[value] for key, value in entries["weight_map"].items()}
    index.unlink()
    (folder / "diffusion_pytorch_model.safetensors.fp16.index.json").write_text(json.dumps(entries))
    check_base_model(tiny_copy)
    assert weights_variant(folder, "unet") == "fp16"
    assert load_base_model(tiny_copy, components=("unet",)).unet is not None
    shard = sorted(older.values())[-1]
    (folder / shard).unlink()
    with pytest.raises(InputError, match=f"fp16.index.json \\(names {shard}, which is not there"):
        check_base_model(tiny_copy)


def test_check_base_model_returns_resolved_path(tiny):
    assert check_base_model(str(tiny)) == tiny.resolve()


def test_check_base_model_missing_dir(tmp_path):
    with pytest.raises(InputError, match="does not exist") as error:
        check_base_model(tmp_path / "nope")
    assert error.value.field == "base_model"


def test_check_base_model_single_file(tmp_path):
    checkpoint = tmp_path / "v1-5-pruned.safetensors"
    checkpoint.write_bytes(b"\0")
    with pytest.raises(InputError, match="not a directory") as error:
        check_base_model(checkpoint)
    assert "single-file" in error.value.message


def test_check_base_model_no_model_index(tiny_copy):
    (tiny_copy / "model_index.json").unlink()
    with pytest.raises(InputError, match=r"model_index\.json") as error:
        check_base_model(tiny_copy)
    assert "diffusers" in error.value.message and "save_pretrained" in error.value.message


def _hugging_face_cache(model: Path, hub: Path) -> Path:
    """`model` as the Hugging Face cache holds a download: models--org--name/snapshots/<revision>/, whose files are
    relative links to blobs/<sha256>."""
    repo, revision = hub / "models--org--tiny-sd", "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(path for path in model.rglob("*") if path.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / revision / file.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo


def test_a_hugging_face_cache_snapshot_copied_without_its_blobs_is_named_as_such(tiny, tmp_path):
    """A snapshot copied out of the cache with `cp -r` keeps its links, not the blobs: it was refused as having no
    model_index.json (which `ls` shows) and as a single-file checkpoint. The cache folder itself was refused so too:
    its snapshot is named. A blob missing in the cache was 'missing: unet weights' though `ls unet/` lists them."""
    repo = _hugging_face_cache(tiny, tmp_path / "hub")
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert check_base_model(snapshot) == snapshot  # in the cache its links resolve

    with pytest.raises(InputError, match="Hugging Face cache folder") as error:
        check_base_model(repo)
    assert f"pass its snapshot, '{snapshot}'" in error.value.message

    copy = Path(shutil.copytree(snapshot, tmp_path / "copy", symlinks=True))  # what `cp -r` makes of it
    with pytest.raises(InputError, match="has links to files that are not there") as error:
        check_base_model(copy)
    target = os.readlink(copy / "model_index.json")
    assert target.startswith("../../blobs/")
    assert f"model_index.json -> {target}" in error.value.message and "cp -rL" in error.value.message
    assert "single-file" not in error.value.message

    unet = snapshot / "unet/diffusion_pytorch_model.safetensors"
    unet.resolve().unlink()
    with pytest.raises(InputError) as error:
        check_base_model(snapshot)
    assert f"unet/diffusion_pytorch_model.safetensors -> {os.readlink(unet)}" in error.value.message
    assert "missing" not in error.value.message

    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(InputError, match=f"is a link to '{tmp_path / 'gone'}', which does not exist"):
        check_base_model(tmp_path / "link")


def test_check_base_model_reports_every_problem_at_once(tiny_copy):
    shutil.rmtree(tiny_copy / "vae")
    (tiny_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (tiny_copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(InputError) as error:
        check_base_model(tiny_copy)
    message = error.value.message
    assert "vae/ folder" in message
    assert "unet weights" in message
    assert "scheduler/scheduler_config.json" in message
    assert "text_encoder" not in message and "tokenizer" not in message


def test_check_base_model_tokenizer_files(tiny_copy):
    (tiny_copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(InputError, match=r"tokenizer/tokenizer\.json"):
        check_base_model(tiny_copy)


def test_fingerprint(tiny_copy):
    first = fingerprint(tiny_copy)
    assert first == fingerprint(tiny_copy)
    assert len(first) == 16 and int(first, 16) >= 0

    config = tiny_copy / "unet" / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = fingerprint(tiny_copy)
    assert touched != first

    (tiny_copy / "vae" / "extra.txt").write_text("x")
    assert fingerprint(tiny_copy) not in (first, touched)


def test_fingerprints_of_same_sized_models_installed_with_the_same_mtimes_differ(tiny_model, tmp_path):
    """Two fine-tunes of one architecture have files of the same sizes; installed with normalised mtimes (a
    reproducible image build) they shared one fingerprint, hence class images and, in serving, a VAE."""
    first, second = (shutil.copytree(tiny_model, tmp_path / name) for name in ("base-a", "base-b"))
    weights = next((second / "vae").glob("*.safetensors"))
    weights.write_bytes(bytes(b ^ 1 for b in weights.read_bytes()))  # other weights, the same size
    for copy in (first, second):
        for file in copy.rglob("*"):
            os.utime(file, ns=(0, 0), follow_symlinks=False)
    assert fingerprint(first) != fingerprint(second)
    same = fingerprint(second)
    (second / "vae").chmod(0o750)  # metadata only: class images are not generated again for it
    for file in (second / "vae").iterdir():
        file.chmod(0o640)
    assert fingerprint(second) == same


def test_fingerprint_follows_linked_components_and_skips_hidden_files(tiny_copy, tmp_path):
    shutil.move(tiny_copy / "unet", tmp_path / "unet")
    (tiny_copy / "unet").symlink_to(tmp_path / "unet", target_is_directory=True)  # a component shared by link
    linked = fingerprint(tiny_copy)
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert fingerprint(tiny_copy) != linked  # the linked folder's files count

    rewritten = fingerprint(tiny_copy)
    (tiny_copy / ".git").mkdir()
    (tiny_copy / ".git" / "FETCH_HEAD").write_text("abc")  # a git fetch in a cloned model
    (tiny_copy / "vae" / ".config.json.swp").write_text("x")
    assert fingerprint(tiny_copy) == rewritten


def test_importing_the_model_code_prints_no_torchvision_noise():
    """transformers' 'requires torchvision' warning is filtered (dreambooth/__init__.py): nothing here uses it."""
    result = subprocess.run(
        [sys.executable, "-c", "import dreambooth.sd_model, serving.engine"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert "torchvision" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("file", "change", "says"),
    [
        ("model_index.json", {"_class_name": "StableDiffusionXLPipeline"}, "StableDiffusionXLPipeline"),
        ("unet/config.json", {"in_channels": 9}, "9/4 channels, not 4/4"),
        ("text_encoder/config.json", {"hidden_size": 48}, "48"),
        ("unet/config.json", None, "unet/config.json is not valid JSON"),
        ("text_encoder/config.json", [], "holds a list, not a JSON object"),
        # What samples after training (validation, the export, serving) must be buildable and seedable.
        ("model_index.json", {"scheduler": ["diffusers", "NoSuchScheduler"]}, "which diffusers"),
        ("model_index.json", {"scheduler": ["diffusers", "DPMSolverSDEScheduler"]}, "seeds do not reproduce"),
        ("scheduler/scheduler_config.json", {"beta_schedule": "no-such-schedule"}, "cannot be built here"),
        # Values of the wrong JSON type are named by file and field (they raised TypeError: an internal error).
        (
            "model_index.json",
            {"_class_name": ["StableDiffusionPipeline"]},
            "model_index.json's _class_name is ['StableDiffusionPipeline']",
        ),
        ("unet/config.json", {"cross_attention_dim": [[32]]}, "unet/config.json's cross_attention_dim is [[32]]"),
        ("text_encoder/config.json", {"hidden_size": [32]}, "text_encoder/config.json's hidden_size is [32]"),
        (
            "text_encoder/config.json",
            {"max_position_embeddings": "77"},
            "text_encoder/config.json's max_position_embeddings is '77'",
        ),
    ],
)
def test_check_base_model_refuses_what_it_cannot_train(tiny_copy, file, change, says):
    """Complete-looking models of another kind (SDXL, inpainting, mismatched parts) are refused by name, before
    any worker would fail on them."""
    path = tiny_copy / file
    if change is None:
        path.write_text("{")
    elif isinstance(change, list):
        path.write_text(json.dumps(change))
    else:
        path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(InputError) as error:
        check_base_model(tiny_copy)
    assert says in error.value.message and "not a text-to-image Stable Diffusion model" in error.value.message


def test_check_base_model_accepts_per_block_cross_attention_widths(tiny_copy):
    config = tiny_copy / "unet" / "config.json"
    unet = json.loads(config.read_text())
    config.write_text(json.dumps(unet | {"cross_attention_dim": [unet["cross_attention_dim"]] * 4}))
    assert check_base_model(tiny_copy) == tiny_copy.resolve()


@pytest.mark.parametrize(
    ("file", "change", "says"),
    [
        # Unset, transformers takes 1e30: the padding to it raised OverflowError in every job.
        (
            "tokenizer/tokenizer_config.json",
            None,
            "model_max_length is 1000000000000000019884624838656 (what transformers takes where it is unset), but "
            "its text encoder takes at most 77 tokens",
        ),
        # A prompt of 78 to 100 tokens passed the check, and the text encoder refused it.
        ("tokenizer/tokenizer_config.json", {"model_max_length": 100}, "model_max_length is 100, but its text encoder"),
        ("tokenizer/tokenizer_config.json", {"model_max_length": "x"}, "model_max_length is 'x', but its text encoder"),
        ("text_encoder/config.json", {"max_position_embeddings": 60}, "model_max_length is 77, but its text encoder"),
    ],
)
def test_a_tokenizer_longer_than_its_text_encoder_is_refused_at_submission(tiny_copy, dog_images, file, change, says):
    """Prompts are checked against the tokenizer's model_max_length and padded to it: one the text encoder cannot
    take is the base model's fault, named with the file to fix, by the loader and so by preflight."""
    path = tiny_copy / file
    config = json.loads(path.read_text())
    if change is None:
        del config["model_max_length"]
    else:
        config |= change
    path.write_text(json.dumps(config))
    spec = JobSpec.from_dict(
        {
            "base_model": str(tiny_copy),
            "instance_images": [str(dog_images)],
            "resolution": 64,
            "instance_prompt": "a photo of sks dog" + " very" * 85,
            "class_prompt": "a photo of dog",
        }
    )
    for check in (lambda: load_base_model(tiny_copy, components=("tokenizer",)), lambda: preflight(spec)):
        with pytest.raises(InputError) as error:
            check()
        assert error.value.field == "base_model"
        assert says in error.value.message
        assert "tokenizer/tokenizer_config.json" in error.value.message
        assert "max_position_embeddings in text_encoder/config.json" in error.value.message


@pytest.mark.parametrize(
    ("scheduler", "spacing", "steps", "samples"),
    [
        ("PNDMScheduler", "leading", 1000, False),  # SD 1.5's: timestep 1000 of 0..999 at the first step
        ("PNDMScheduler", "leading", 999, True),
        ("DPMSolverMultistepScheduler", "leading", 1000, False),  # 1000 equal timesteps: fails at the last step
        ("EulerDiscreteScheduler", "leading", 1000, True),  # its sigmas clamp: it samples to the end
        ("DDIMScheduler", "trailing", 1000, True),
        ("LCMScheduler", "leading", 51, False),  # refuses more than its original_inference_steps (50)
        ("LCMScheduler", "leading", 50, True),
    ],
)
def test_sampling_steps_are_tried_not_predicted(tiny, scheduler, spacing, steps, samples):
    """A count a scheduler cannot sample to the end is refused (InputError naming the field): a max-timestep rule
    refused some that sample (Euler at 1000) and let through some that fail (DPM-Solver at 1000)."""
    import diffusers

    from dreambooth.errors import InputError
    from dreambooth.model_files import check_inference_steps, sampling_scheduler

    config = sampling_scheduler(tiny).config
    built = getattr(diffusers, scheduler).from_config(config, timestep_spacing=spacing)
    if samples:
        check_inference_steps(built, steps, "steps")
    else:
        with pytest.raises(InputError, match=f"{scheduler} cannot sample {steps} steps") as error:
            check_inference_steps(built, steps, "steps")
        assert error.value.field == "steps"
    assert built.num_inference_steps is None  # tried on a scheduler of its own
