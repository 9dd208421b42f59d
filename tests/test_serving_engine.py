"""The sampling engine without Ray Serve: batched classifier-free guidance, seeds, shared components."""

from __future__ import annotations

import collections
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dreambooth.errors import InputError
from dreambooth.sd_model import check_prompt, load_pipeline
from serving.engine import GenerationRequest, SamplingEngine

SIZE = 64  # the tiny model's native size
STEPS = 4


def request(**overrides) -> GenerationRequest:
    fields = {"prompt": "a photo of sks dog", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 7}
    return GenerationRequest(**(fields | overrides))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


@pytest.fixture(scope="module")
def engine() -> SamplingEngine:
    return SamplingEngine(device="cpu")


@pytest.fixture(scope="module")
def rex(engine, subject_models):
    return engine.load("rex", subject_models["rex"])


def test_a_seeded_request_gives_the_same_images_alone_and_in_a_batch(engine, rex, monkeypatch):
    alone = request(num_images=2, guidance_scale=5.0)
    [solo] = engine.generate(rex, [alone])
    others = [
        request(prompt="a photo of sks dog on the beach", seed=1, guidance_scale=9.0),
        request(negative_prompt="blurry", seed=2, num_images=3, guidance_scale=1.5),
    ]
    decoded, decode = [], rex.vae.decode
    monkeypatch.setattr(rex.vae, "decode", lambda latents, **kw: decoded.append(len(latents)) or decode(latents, **kw))
    batched = engine.generate(rex, [others[0], alone, others[1]])
    assert [r.batch_size for r in batched] == [3, 3, 3] and batched[1].batch_images == 6
    assert decoded == [4, 2]  # the VAE's memory grows with the images it decodes at once: a few at a time
    assert batched[1].seeds == solo.seeds == [7, 8]
    for a, b in zip(solo.images, batched[1].images, strict=True):
        # Different batch sizes may round differently in the last float bits: at most one 8-bit level.
        assert np.abs(pixels(a) - pixels(b)).max() <= 1 / 255 + 1e-6
    # Each request's own negative prompt: "blurry" here, beside the others' "" (given the first request's, its
    # images would be those of an empty negative prompt).
    [blurry] = engine.generate(rex, [others[1]])
    assert batched[2].seeds == blurry.seeds == [2, 3, 4]
    for a, b in zip(blurry.images, batched[2].images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1 / 255 + 1e-6
    # Image i of a request is image 0 of the same request seeded seed + i.
    [second] = engine.generate(rex, [request(seed=8, guidance_scale=5.0)])
    assert np.abs(pixels(second.images[0]) - pixels(solo.images[1])).max() <= 1 / 255 + 1e-6
    # ... and different seeds give different images.
    assert np.abs(pixels(solo.images[0]) - pixels(solo.images[1])).mean() > 0.01


def test_images_without_guidance_run_no_unconditional_half(engine, rex, monkeypatch):
    """A scale up to 1 (distilled models sample so) is the prompt's prediction alone, its negative prompt unused: its
    image costs one UNet row a step, not two, alone or beside guided images, and stays the image it was alone."""
    rows, forward = [], rex.unet.forward
    monkeypatch.setattr(rex.unet, "forward", lambda x, *args, **kw: rows.append(len(x)) or forward(x, *args, **kw))
    unguided = request(seed=5, num_images=2, guidance_scale=1.0, negative_prompt="blurry")
    [alone] = engine.generate(rex, [unguided])
    assert rows == [2] * STEPS
    [no_negative] = engine.generate(rex, [request(seed=5, num_images=2, guidance_scale=0.5)])
    for a, b in zip(alone.images, no_negative.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    guided = request(prompt="sks dog in snow", seed=1, guidance_scale=6.0)
    [guided_alone] = engine.generate(rex, [guided])
    rows.clear()
    batched = engine.generate(rex, [unguided, guided, request(seed=9, guidance_scale=0.0)])
    assert rows == [2 + 2 + 1] * STEPS  # the guided image's two halves, a row for each image without guidance
    for solo, together in ((alone, batched[0]), (guided_alone, batched[1])):
        for a, b in zip(solo.images, together.images, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1 / 255 + 1e-6


def test_steps_the_models_scheduler_cannot_take_are_the_requests_fault(engine, rex):
    """SD 1.5's schedule (steps_offset 1, as the tiny model's) at 1000 steps starts at timestep 1000 of 0..999: an
    IndexError at the first step, which failed every request sharing its forward with a 500."""
    with pytest.raises(InputError, match=r"cannot sample 1000 steps \(IndexError") as error:
        engine.start(rex, [request(steps=1000)])
    assert error.value.field == "steps"
    assert engine.start(rex, [request(steps=999)]).scheduler.timesteps.max() == 999


def test_batched_guidance_matches_a_two_pass_reference(engine, rex, subject_models):
    """One UNet forward over both halves with per-sample scales == the textbook two forwards per request."""
    requests = [request(seed=3, guidance_scale=2.0), request(prompt="sks dog in snow", seed=4, guidance_scale=8.0)]
    batched = engine.generate(rex, requests)

    pipe = load_pipeline(subject_models["rex"])
    for req, result in zip(requests, batched, strict=True):
        generator = torch.Generator().manual_seed(req.seed)
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(req.steps)
        with torch.no_grad():
            cond = pipe.encode_prompt(req.prompt, "cpu", 1, False)[0]
            uncond = pipe.encode_prompt(req.negative_prompt, "cpu", 1, False)[0]
            size = SIZE // pipe.vae_scale_factor
            latents = torch.randn((1, 4, size, size), generator=generator) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(latents, t)
                noise_uncond = pipe.unet(x, t, encoder_hidden_states=uncond).sample
                noise_cond = pipe.unet(x, t, encoder_hidden_states=cond).sample
                noise = noise_uncond + req.guidance_scale * (noise_cond - noise_uncond)
                latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        expected = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        assert np.abs(pixels(result.images[0]) - expected).max() <= 1 / 255


@pytest.mark.parametrize("guidance_scale", [6.0, 0.0])  # up to 1, no guidance: the prompt alone, as diffusers
def test_matches_diffusers_pipeline_with_the_same_generators(engine, rex, subject_models, guidance_scale):
    check_matches_the_pipeline(engine, rex, subject_models["rex"], guidance_scale)


def with_scheduler(model_dir, out, name: str, config: dict | None = None):
    """A copy of the model at `model_dir` whose model_index.json names scheduler `name`, with `config` as its
    scheduler_config.json (by default its own config, as `name` saves it)."""
    shutil.copytree(model_dir, out)
    if config is None:
        scheduler = getattr(diffusers, name).from_pretrained(out, subfolder="scheduler")
        scheduler.save_pretrained(out / "scheduler")
    else:
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"_class_name": name}))
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(index | {"scheduler": ["diffusers", name]}))
    return out


def test_a_model_that_ships_the_lms_scheduler_is_served(engine, subject_models, tmp_path):
    """diffusers' LMS scheduler needs scipy (a dependency for this): without it such a model failed to load."""
    model_dir = with_scheduler(subject_models["rex"], tmp_path / "lms", "LMSDiscreteScheduler")
    model = engine.load("rex-lms", model_dir)
    assert isinstance(model.scheduler, LMSDiscreteScheduler)
    check_matches_the_pipeline(engine, model, model_dir, guidance_scale=6.0)


def test_an_old_ddim_config_samples_as_the_pipeline_corrects_it(engine, subject_models, tmp_path):
    """A scheduler config from before steps_offset and clip_sample (early conversions wrote such; the export copies
    the base's): StableDiffusionPipeline, which validation and class images sample with, sets steps_offset 1 and
    clip_sample False; serving sampled with the config as on disk (0 and True: DDIM clipped the predicted x0 of the
    latents to [-1, 1]), images up to 0.88 apart from the pipeline's."""
    config = json.loads((subject_models["rex"] / "scheduler" / "scheduler_config.json").read_text())
    old = {key: config[key] for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")}
    model_dir = with_scheduler(subject_models["rex"], tmp_path / "ddim", "DDIMScheduler", old)
    model = engine.load("rex-ddim", model_dir)
    assert isinstance(model.scheduler, diffusers.DDIMScheduler)
    assert (model.scheduler.config.steps_offset, model.scheduler.config.clip_sample) == (1, False)
    check_matches_the_pipeline(engine, model, model_dir, guidance_scale=6.0)


def check_matches_the_pipeline(engine, model, model_dir, guidance_scale: float) -> None:
    pipe = load_pipeline(model_dir)
    req = request(num_images=2, guidance_scale=guidance_scale, negative_prompt="low quality")
    [result] = engine.generate(model, [req])
    expected = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        guidance_scale=req.guidance_scale,
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        output_type="np",
    ).images
    for image, reference in zip(result.images, expected, strict=True):
        assert np.abs(pixels(image) - reference).max() <= 1 / 255


class DeviceTraffic(TorchDispatchMode):
    """Counts what the meta device lets through but a GPU would wait for or refuse: copies from the host (from
    ordinary host memory, each waits for the GPU's queue), a host tensor other than a 0-dim scalar meeting a device
    one (a device mismatch on a GPU), linear algebra (cuSOLVER reads its status back)."""

    def __init__(self):
        super().__init__()
        self.found: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [x for x in tree_leaves((args, kwargs or {})) if isinstance(x, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tensors}
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if devices == {"cpu"} and any(o.device.type == "meta" for o in outputs):
            self.found["host-to-device copy"] += 1
        if devices == {"cpu", "meta"} and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.found[f"host tensor meets device tensor ({func})"] += 1
        if "linalg" in str(func):
            self.found[str(func)] += 1
        return out


def test_denoising_waits_for_nothing_on_the_device(subject_models):
    """On a GPU the host queues the next denoising steps while the device runs this one, unless a step reads a device
    value back (`.item()`, `bool()`, `nonzero`, a copy to the host), copies from the host, or mixes host and device
    tensors. The engine samples on the meta device (tensors without data), where every read back raises and
    `DeviceTraffic` counts the rest: each scheduler a model may ship, a cohort joining another part-way, to the end."""
    engine = SamplingEngine(device="meta", dtype=torch.float32)
    model = engine.load("rex", subject_models["rex"])
    config = model.scheduler.config
    schedulers = {
        "SD 1.5's PNDM": diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True),
        "PNDM with its Runge-Kutta warm-up": diffusers.PNDMScheduler.from_config(config),
        **{
            name: getattr(diffusers, name).from_config(config)
            for name in (
                "DDIMScheduler",
                "EulerDiscreteScheduler",
                "LMSDiscreteScheduler",
                "DPMSolverMultistepScheduler",
                "HeunDiscreteScheduler",  # two UNet evaluations a step
                # These draw each step's noise from the images' generators on the host (what makes a seeded image
                # the same in any batch): one copy to the device a step, counted apart.
                "DDPMScheduler",
                "EulerAncestralDiscreteScheduler",
            )
        },
    }
    # Not held to it: diffusers 0.42.1's UniPC copies its sigmas to the device and solves on it every step.
    for name, scheduler in schedulers.items():
        model.scheduler = scheduler
        first = engine.start(model, [request(seed=1, steps=6)])  # PNDM's 4th-order steps from the 5th on
        with DeviceTraffic() as traffic:
            engine.denoise([first])
        second = engine.start(model, [request(seed=2, num_images=2, guidance_scale=3.0, steps=6)])
        with traffic:
            while not second.done:
                engine.denoise([second] + ([first] if not first.done else []))
        assert first.done and first.latents.device.type == "meta", name
        found = dict(traffic.found)
        if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler"):
            copies = found.pop("host-to-device copy", 0)
            assert 0 < copies <= first.step + second.step, (name, copies)  # the noise, one per cohort and step
        assert not found, (name, found)


def test_two_subjects_share_the_base_components_but_draw_differently(engine, rex, subject_models):
    fido = engine.load("fido", subject_models["fido"])
    assert fido.vae is rex.vae and fido.tokenizer is rex.tokenizer
    assert fido.text_encoder is rex.text_encoder  # not trained: the base's, shared
    assert fido.unet is not rex.unet
    [a] = engine.generate(rex, [request()])
    [b] = engine.generate(fido, [request()])
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).mean() > 0.01
    assert rex.metadata.class_prompt == "a photo of dog"


def test_the_base_models_vae_outlives_the_subject_swapped_out(subject_models):
    """A replica that holds one model at a time (max_models_per_replica: 1) lets each subject go before it loads
    the next: the next one of the same base still finds the VAE (and untrained text encoder) loaded."""
    import gc
    import weakref

    engine = SamplingEngine(device="cpu")  # its own: the module's engine has other subjects of the base loaded
    first = engine.load("first", subject_models["fido"])
    vae, text_encoder = weakref.ref(first.vae), weakref.ref(first.text_encoder)
    del first
    gc.collect()
    second = engine.load("second", subject_models["rex"])
    assert second.vae is vae() and second.text_encoder is text_encoder()


def test_a_trained_text_encoder_is_not_shared(engine, rex, tiny_model, tmp_path):
    from tests.conftest import write_subject_model

    path = write_subject_model(tiny_model, tmp_path / "max", seed=5, train_text_encoder=True)
    subject = engine.load("max", path)
    assert subject.vae is rex.vae
    assert subject.text_encoder is not rex.text_encoder
    # One tokenizer per base model, also what a request's prompts are checked with before its model loads.
    assert subject.tokenizer is rex.tokenizer is engine.tokenizer(path)


def test_a_model_exported_with_an_older_fingerprint_shares_nothing(engine, rex, subject_models, tmp_path):
    """Fingerprints before version 2 told apart no fine-tunes whose files had the same sizes and mtimes: a model
    exported with one must not sample with another base's VAE or text encoder."""
    old = shutil.copytree(subject_models["fido"], tmp_path / "old")
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["base_model_fingerprint_version"]  # as exports wrote it before the version
    (old / "metadata.json").write_text(json.dumps(metadata))
    subject = engine.load("old", old)
    assert subject.vae is not rex.vae and subject.text_encoder is not rex.text_encoder
    assert subject.tokenizer is not rex.tokenizer


def test_bad_batches_and_prompts_are_refused(engine, rex):
    with pytest.raises(ValueError, match="one batch holds one"):
        engine.generate(rex, [request(), request(steps=STEPS + 1)])
    check_prompt(rex.tokenizer, "prompt", "a photo of sks dog")
    with pytest.raises(InputError, match="tokens; at most 77") as error:
        check_prompt(rex.tokenizer, "negative_prompt", "dog " * 100)
    assert error.value.field == "negative_prompt"


def test_prompt_checks_and_batch_encoding_take_turns_with_the_tokenizer(engine, rex, subject_models):
    """A replica checks prompts on request threads while its device thread encodes batches, with one tokenizer
    whose calls set its truncation and padding before encoding: a check in between let a too-long prompt through
    (truncated) or left a batch unpadded. Each waits while the other holds the tokenizer."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        with engine._tokenizing:  # as a batch encoding its prompts would
            checked = pool.submit(engine.check_prompts, subject_models["rex"], {"prompt": "dog " * 100})
            encoded = pool.submit(engine.start, rex, [request(steps=1)])  # milliseconds, when not held up
            assert not checked.done() and not encoded.done()
            threading.Event().wait(0.2)  # time to run past the tokenizer, if they did not wait for it
            assert not checked.done() and not encoded.done()
        with pytest.raises(InputError, match="tokens; at most 77"):
            checked.result(timeout=60)
        assert encoded.result(timeout=60).text_states.shape[1] == rex.tokenizer.model_max_length


def test_a_compiled_unet_samples_the_native_size_as_the_eager_one(engine, rex, subject_models, monkeypatch):
    """compile_unet: after warm_up, requests at the native size run the compiled graphs (no compiling left for
    other batch sizes or other subjects) and give the eager engine's images; other sizes run eagerly."""
    import gc
    import weakref

    import torch._dynamo

    compiled = SamplingEngine(device="cpu", compile_unet=True)
    model = compiled.load("rex", subject_models["rex"])
    assert model.native_size == (SIZE, SIZE)
    torch._dynamo.utils.counters.clear()
    compiled.warm_up(model, max_images=3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1

    # Another subject of the architecture runs the same graphs with its own weights (not rex's baked in); its load
    # warms up nothing again (that would hold every running request for two batches).
    other = compiled.load("other", subject_models["fido"])
    sampled = []
    with monkeypatch.context() as spying:
        spying.setattr(compiled, "generate", lambda *args: sampled.append(args))
        compiled.warm_up(other, max_images=3)
        assert sampled == []
        compiled.warm_up(other, max_images=4)  # a batch size not run yet
        assert [[r.num_images for r in requests] for _, requests in sampled] == [[4]]
    sampled.clear()  # they hold the model
    fido = engine.load("fido", subject_models["fido"])
    batch = [request(seed=3, num_images=2, guidance_scale=4.0), request(prompt="sks dog in snow", seed=5)]
    for subject, reference in ((model, rex), (other, fido)):
        for expected, got in zip(engine.generate(reference, batch), compiled.generate(subject, batch), strict=True):
            assert got.compiled_unet and not expected.compiled_unet
            for a, b in zip(expected.images, got.images, strict=True):
                assert np.abs(pixels(a) - pixels(b)).max() <= 2 / 255 + 1e-6
    # An image without guidance alone is a batch of one row, which torch.compile would specialize: no graph either.
    [unguided] = compiled.generate(model, [request(seed=4, guidance_scale=1.0)])
    [expected] = engine.generate(rex, [request(seed=4, guidance_scale=1.0)])
    assert unguided.compiled_unet and np.abs(pixels(unguided.images[0]) - pixels(expected.images[0])).max() <= 2 / 255
    [eager] = compiled.generate(model, [request(width=SIZE + 8)])  # not the native size: eager
    assert not eager.compiled_unet
    # Step-level batching runs forwards of any size up to the batch limit, cohorts at different timesteps.
    joined = [compiled.start(model, [request(seed=s, num_images=images)]) for s, images in ((1, 1), (2, 1))]
    compiled.denoise(joined[:1])
    compiled.denoise(joined)  # 2 images, two timesteps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # An evicted subject's weights are freed: the shared graphs take parameters as inputs, they do not hold them.
    evicted = weakref.ref(other.unet)
    del other, subject
    gc.collect()
    assert evicted() is None
