"""The one place that maps between the trainer's JobSpec (YAML keys) and the gRPC TrainingSpec message.

Both field lists are derived, not written down here: JobSpec's dataclass fields on one side, the proto
descriptor on the other (tests assert they name the same fields, so they cannot drift apart). Enum values
map by name: JobSpec's Literal choice "fp16" of type `Precision` is the proto's `PRECISION_FP16`.

A client sends only the fields it set; the controller fills in the trainer's defaults when it accepts a job and
stores the whole spec, which `Job.spec` then carries back (so a job keeps the defaults it was submitted with).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from google.protobuf import unknown_fields
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from dreambooth.errors import InputError
from dreambooth.v1 import jobs_pb2
from trainer.spec import JobSpec

# SubmitJobRequest.priority's bounds (jobs.proto): the controller refuses others, the SDK before reading photos.
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000

# Images travel as InstanceImage messages beside the spec (bytes or a URI), never inside it.
NOT_IN_PROTO: frozenset[str] = frozenset({"instance_images"})

_TRAINING_SPEC = jobs_pb2.TrainingSpec.DESCRIPTOR
_STATE = jobs_pb2.State.DESCRIPTOR


def spec_fields() -> list[str]:
    """JobSpec's fields that TrainingSpec carries, in JobSpec's order."""
    return [f.name for f in dataclasses.fields(JobSpec) if f.name not in NOT_IN_PROTO]


def proto_fields() -> list[str]:
    return [f.name for f in _TRAINING_SPEC.fields]


# --- JobSpec <-> TrainingSpec ---------------------------------------------------------------------------


def spec_to_proto(spec: Mapping[str, Any], *, stored: bool = False) -> jobs_pb2.TrainingSpec:
    """A TrainingSpec with exactly the keys present in `spec` (JobSpec's YAML keys) set.

    Raises InputError naming the field for an unknown key, an unknown enum choice or a value of the wrong type;
    with `stored` (a job's spec, which an older version may have written) such a field is left out instead: one
    retired since would otherwise fail every GetJob, ListJobs page and WatchJob of the jobs that have it.
    `instance_images` is skipped: images travel as InstanceImage messages.
    """
    msg = jobs_pb2.TrainingSpec()
    for name, value in spec.items():
        if name in NOT_IN_PROTO:
            continue
        try:
            _set_field(msg, name, value)
        except InputError:
            if not stored:
                raise
    return msg


def _set_field(msg: jobs_pb2.TrainingSpec, name: str, value: Any) -> None:
    field = _TRAINING_SPEC.fields_by_name.get(name)
    if field is None:
        raise InputError(name, f"unknown field; known fields: {sorted([*spec_fields(), *NOT_IN_PROTO])}")
    if field.enum_type is not None:
        setattr(msg, name, _enum_number(name, field.enum_type, value))
    elif field.is_repeated:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InputError(name, f"must be a list of strings, got {value!r}")
        getattr(msg, name).extend(value)
    else:
        _set_scalar(msg, field, value)


def refuse_unknown_fields(msg: Message, name: str = "") -> None:
    """InputError where `msg` has a field set that this code does not know (a newer client's): the call would go on
    without what the client asked for. `name`: msg's own field, if it is one (its type's name otherwise)."""
    if unknown := sorted({field.field_number for field in unknown_fields.UnknownFieldSet(msg)}):
        raise InputError(
            name or msg.DESCRIPTOR.name,
            f"fields this controller does not know (numbers {unknown}): set by a newer client; leave them unset, or "
            "upgrade the controller",
        )


def proto_to_spec_fields(msg: jobs_pb2.TrainingSpec) -> dict[str, Any]:
    """The fields the client set, as JobSpec keyword arguments (so JobSpec's defaults apply to the rest).

    "Set" means: present (optional scalars), not UNSPECIFIED (enums), not empty (repeated fields and the two
    required strings, which have no presence in proto3 and are therefore "set" when non-empty).
    Raises InputError for an enum number or a field this code does not know (a newer client's): the job would
    otherwise train without what the client asked for.
    """
    refuse_unknown_fields(msg, "spec")
    fields: dict[str, Any] = {}
    for field in _TRAINING_SPEC.fields:
        name = field.name
        value = getattr(msg, name)
        if field.enum_type is not None:
            if value != 0:
                fields[name] = _enum_choice(name, field.enum_type, value)
        elif field.is_repeated:
            if value:
                fields[name] = list(value)
        elif field.has_presence:
            if msg.HasField(name):
                fields[name] = value
        elif value:
            fields[name] = value
    return fields


# --- enums ------------------------------------------------------------------------------------------------


def state_name(value: int) -> str:
    """jobs_pb2.STATE_QUEUED -> "QUEUED" (and 0 -> "UNSPECIFIED"); unknown numbers -> "STATE_<n>"."""
    known = _STATE.values_by_number.get(value)
    return known.name.removeprefix("STATE_") if known else f"STATE_{value}"


def state_value(name: str) -> int:
    """ "QUEUED", "queued" or "STATE_QUEUED" -> jobs_pb2.STATE_QUEUED; InputError for anything else."""
    key = name.strip().upper()
    known = _STATE.values_by_name.get(key) or _STATE.values_by_name.get(f"STATE_{key}")
    if known is None or known.number == 0:
        choices = [v.name.removeprefix("STATE_") for v in _STATE.values if v.number != 0]
        raise InputError("state", f"unknown state {name!r}; one of {choices}")
    return known.number


def timestamp(epoch_seconds: float) -> Timestamp:
    # Split before scaling: epoch_seconds * 1e9 would lose the nanoseconds to float precision.
    seconds = math.floor(epoch_seconds)
    nanos = round((epoch_seconds - seconds) * 1e9)
    if nanos == 1_000_000_000:
        seconds, nanos = seconds + 1, 0
    return Timestamp(seconds=seconds, nanos=nanos)


# --- internals --------------------------------------------------------------------------------------------


@cache
def _choices(field_name: str) -> tuple[str, ...]:
    """The Literal choices of a JobSpec field, e.g. ("fp16", "bf16", "fp32") for `precision`."""
    return typing.get_args(typing.get_type_hints(JobSpec)[field_name])


def _prefix(enum: EnumDescriptor) -> str:
    # Every enum's zero value is <PREFIX>UNSPECIFIED (buf lint's ENUM_ZERO_VALUE_SUFFIX), e.g. LR_SCHEDULE_.
    return enum.values_by_number[0].name.removesuffix("UNSPECIFIED")


def _enum_number(name: str, enum: EnumDescriptor, choice: Any) -> int:
    choices = _choices(name)
    if choice not in choices:
        raise InputError(name, f"must be one of {list(choices)}, got {choice!r}")
    value = enum.values_by_name.get(_prefix(enum) + choice.upper())
    if value is None:  # JobSpec gained a choice the proto lacks: a bug here, not the user's input
        raise AssertionError(f"{enum.full_name} has no value for {name}={choice!r}")
    return value.number


def _enum_choice(name: str, enum: EnumDescriptor, number: int) -> str:
    value = enum.values_by_number.get(number)
    by_upper = {c.upper(): c for c in _choices(name)}
    choice = by_upper.get(value.name.removeprefix(_prefix(enum))) if value else None
    if choice is None:
        raise InputError(name, f"unknown {enum.name} value {number}; one of {list(by_upper.values())}")
    return choice


# What a YAML value must be for each proto scalar type. bool is an int in Python, and protobuf quietly takes
# True for a step count: rule it out by hand.
_EXPECTED: dict[int, tuple[str, tuple[type, ...]]] = {
    FieldDescriptor.TYPE_STRING: ("a string", (str,)),
    FieldDescriptor.TYPE_BOOL: ("a bool", (bool,)),
    FieldDescriptor.TYPE_INT32: ("an int", (int,)),
    FieldDescriptor.TYPE_INT64: ("an int", (int,)),
    FieldDescriptor.TYPE_DOUBLE: ("a number", (int, float)),
}


def _set_scalar(msg: jobs_pb2.TrainingSpec, field: FieldDescriptor, value: Any) -> None:
    expected, types = _EXPECTED[field.type]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise InputError(field.name, f"must be {expected}, got {value!r}")
    try:
        setattr(msg, field.name, value)
    except ValueError as e:  # out of the proto type's range (int32, int64)
        raise InputError(field.name, f"{value!r} is out of range ({e})") from e
