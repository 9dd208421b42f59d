"""JobSpec <-> TrainingSpec: same fields on both sides, enums by name, only what the client set travels."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dreambooth.errors import InputError
from dreambooth.proto_convert import (
    proto_fields,
    proto_to_spec_fields,
    spec_fields,
    spec_to_proto,
    state_name,
    state_value,
    timestamp,
)
from dreambooth.v1 import jobs_pb2
from trainer.spec import JobSpec

MINIMAL = {
    "base_model": "/models/sd",
    "instance_images": ["photos/"],
    "instance_prompt": "a photo of sks dog",
    "class_prompt": "a photo of dog",
}
HINTS = typing.get_type_hints(JobSpec)


def test_jobspec_and_training_spec_have_the_same_fields():
    job_fields = {f.name for f in dataclasses.fields(JobSpec)} - {"instance_images"}
    message_fields = {f.name for f in jobs_pb2.TrainingSpec.DESCRIPTOR.fields}
    assert job_fields - message_fields == set(), "JobSpec fields missing from TrainingSpec in jobs.proto"
    assert message_fields - job_fields == set(), "TrainingSpec fields that JobSpec does not have"
    assert set(spec_fields()) == set(proto_fields()) == job_fields


def test_enum_fields_have_the_same_choices():
    # Both directions: every JobSpec choice has a proto value, every non-zero proto value is a JobSpec choice.
    for field in jobs_pb2.TrainingSpec.DESCRIPTOR.fields:
        if field.enum_type is None:
            continue
        choices = typing.get_args(HINTS[field.name])
        assert choices, f"{field.name} is an enum in the proto but not a Literal in JobSpec"
        numbers = {getattr(spec_to_proto({field.name: c}), field.name) for c in choices}
        assert numbers == {v.number for v in field.enum_type.values} - {0}
        for choice in choices:
            assert proto_to_spec_fields(spec_to_proto({field.name: choice})) == {field.name: choice}


def test_enum_names():
    msg = spec_to_proto({"precision": "fp16", "lr_schedule": "cosine", "placement_strategy": "STRICT_SPREAD"})
    assert msg.precision == jobs_pb2.PRECISION_FP16
    assert msg.lr_schedule == jobs_pb2.LR_SCHEDULE_COSINE
    assert msg.placement_strategy == jobs_pb2.PLACEMENT_STRATEGY_STRICT_SPREAD


def test_only_set_fields_travel_and_defaults_apply_to_the_rest():
    written = {"base_model": "/models/sd", "instance_prompt": "a photo of sks dog", "max_steps": 50}
    msg = spec_to_proto({**written, "instance_images": ["photos/"]})
    assert [f.name for f, _ in msg.ListFields()] == ["base_model", "instance_prompt", "max_steps"]
    fields = proto_to_spec_fields(jobs_pb2.TrainingSpec.FromString(msg.SerializeToString()))
    assert fields == written
    spec = JobSpec.from_dict({**fields, "instance_images": ["x.jpg"], "num_class_images": 0})
    assert spec.max_steps == 50 and spec.resolution == JobSpec.resolution and spec.precision == "fp16"


def test_explicit_zero_false_and_empty_values_survive():
    written = {"num_class_images": 0, "train_text_encoder": False, "seed": 0, "class_prompt": "", "lr_warmup_steps": 0}
    wire = jobs_pb2.TrainingSpec.FromString(spec_to_proto(written).SerializeToString())
    assert proto_to_spec_fields(wire) == written


def test_full_spec_round_trip():
    spec = JobSpec.from_dict({**MINIMAL, "validation_prompts": ["a sks dog on the moon"], "zero_stage": 3})
    fields = {k: v for k, v in spec.to_dict().items() if k != "instance_images"}
    wire = jobs_pb2.TrainingSpec.FromString(spec_to_proto(spec.to_dict()).SerializeToString())
    assert proto_to_spec_fields(wire) == fields


_INT32 = st.integers(-(2**31), 2**31 - 1)
_BY_TYPE = {
    "str": st.text(max_size=20),
    "int": _INT32,
    "float": st.floats(allow_nan=False) | _INT32,
    "bool": st.booleans(),
    "list[str]": st.lists(st.text(max_size=10), max_size=3),
}


def _value(name: str) -> st.SearchStrategy:
    if name == "seed":
        return st.integers(-(2**63), 2**63 - 1)  # the one int64
    hint = {f.name: f.type for f in dataclasses.fields(JobSpec)}[name]  # "int", "float", ... or an enum Literal
    return _BY_TYPE[hint] if hint in _BY_TYPE else st.sampled_from(typing.get_args(HINTS[name]))


@given(st.fixed_dictionaries({}, optional={name: _value(name) for name in spec_fields()}))
def test_any_subset_of_fields_round_trips(written):
    wire = jobs_pb2.TrainingSpec.FromString(spec_to_proto(written).SerializeToString())
    # The two plain (no presence) strings and an empty list read back as unset when empty: the same meaning.
    expected = {
        k: v for k, v in written.items() if v or k not in ("base_model", "instance_prompt", "validation_prompts")
    }
    assert proto_to_spec_fields(wire) == expected


@pytest.mark.parametrize(
    ("written", "field", "words"),
    [
        ({"resolution": True}, "resolution", "must be an int"),
        ({"resolution": 512.0}, "resolution", "must be an int"),
        ({"learning_rate": "5e-6"}, "learning_rate", "must be a number"),
        ({"train_text_encoder": 1}, "train_text_encoder", "must be a bool"),
        ({"class_prompt": None}, "class_prompt", "must be a string"),
        ({"max_steps": 2**40}, "max_steps", "out of range"),
        ({"validation_prompts": "a sks dog"}, "validation_prompts", "list of strings"),
        ({"precision": "fp8"}, "precision", "one of ['fp16', 'bf16', 'fp32']"),
        ({"placement_strategy": "spread"}, "placement_strategy", "one of"),
        ({"resolutoin": 512}, "resolutoin", "unknown field"),
    ],
)
def test_bad_values_name_the_field(written, field, words):
    with pytest.raises(InputError) as error:
        spec_to_proto(written)
    assert error.value.field == field and words in error.value.message


def test_unknown_enum_number_from_a_newer_client():
    msg = jobs_pb2.TrainingSpec(base_model="/m", instance_prompt="sks")
    msg.precision = 99  # proto3 enums are open: a newer client's value arrives as a bare number
    with pytest.raises(InputError) as error:
        proto_to_spec_fields(jobs_pb2.TrainingSpec.FromString(msg.SerializeToString()))
    assert error.value.field == "precision" and "99" in error.value.message


def test_fields_unknown_to_this_controller_are_refused_not_dropped():
    """A newer client's field, dropped, would train the job without what it asked for."""
    newer = jobs_pb2.TrainingSpec(base_model="/m", instance_prompt="sks").SerializeToString()
    newer += bytes([0xF8, 0x06, 0x05])  # field 111, varint 5: a field of a later TrainingSpec
    with pytest.raises(InputError) as error:
        proto_to_spec_fields(jobs_pb2.TrainingSpec.FromString(newer))
    assert error.value.field == "spec" and "numbers [111]" in error.value.message


def test_a_stored_spec_keeps_what_this_version_knows_and_leaves_out_the_rest():
    """A job's spec that an older version stored, with a field or a choice since retired: GetJob, ListJobs and
    WatchJob of it still answer (strictly, each failed INVALID_ARGUMENT for good)."""
    stored = {**MINIMAL, "max_steps": 10, "colour": "blue", "precision": "fp4"}
    with pytest.raises(InputError):
        spec_to_proto(stored)
    msg = spec_to_proto(stored, stored=True)
    assert msg.max_steps == 10 and msg.precision == jobs_pb2.PRECISION_UNSPECIFIED
    assert msg == spec_to_proto({k: v for k, v in stored.items() if k not in ("colour", "precision")})


def test_instance_images_are_not_part_of_the_message():
    assert spec_to_proto(MINIMAL) == spec_to_proto({k: v for k, v in MINIMAL.items() if k != "instance_images"})


def test_states():
    assert state_name(jobs_pb2.STATE_QUEUED) == "QUEUED"
    assert state_name(jobs_pb2.STATE_CANCELLED) == "CANCELLED"
    assert state_name(42) == "STATE_42"
    assert state_value("QUEUED") == state_value("queued") == state_value("STATE_QUEUED") == jobs_pb2.STATE_QUEUED
    for value in jobs_pb2.State.values():
        if value:
            assert state_value(state_name(value)) == value
    for bad in ("RUNNING", "UNSPECIFIED", ""):
        with pytest.raises(InputError, match="unknown state"):
            state_value(bad)


def test_timestamp():
    ts = timestamp(1_700_000_000.25)
    assert (ts.seconds, ts.nanos) == (1_700_000_000, 250_000_000)
    assert timestamp(0).ToSeconds() == 0
