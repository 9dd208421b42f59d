import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    STATE_QUEUED: _ClassVar[State]
    STATE_PREPARING: _ClassVar[State]
    STATE_TRAINING: _ClassVar[State]
    STATE_EXPORTING: _ClassVar[State]
    STATE_SUCCEEDED: _ClassVar[State]
    STATE_FAILED: _ClassVar[State]
    STATE_CANCELLING: _ClassVar[State]
    STATE_CANCELLED: _ClassVar[State]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_LINEAR: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]

class PlacementStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_STRATEGY_UNSPECIFIED: _ClassVar[PlacementStrategy]
    PLACEMENT_STRATEGY_PACK: _ClassVar[PlacementStrategy]
    PLACEMENT_STRATEGY_SPREAD: _ClassVar[PlacementStrategy]
    PLACEMENT_STRATEGY_STRICT_PACK: _ClassVar[PlacementStrategy]
    PLACEMENT_STRATEGY_STRICT_SPREAD: _ClassVar[PlacementStrategy]

class CompileBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPILE_BACKEND_UNSPECIFIED: _ClassVar[CompileBackend]
    COMPILE_BACKEND_INDUCTOR: _ClassVar[CompileBackend]
    COMPILE_BACKEND_AOT_EAGER: _ClassVar[CompileBackend]
STATE_UNSPECIFIED: State
STATE_QUEUED: State
STATE_PREPARING: State
STATE_TRAINING: State
STATE_EXPORTING: State
STATE_SUCCEEDED: State
STATE_FAILED: State
STATE_CANCELLING: State
STATE_CANCELLED: State
PRECISION_UNSPECIFIED: Precision
PRECISION_FP16: Precision
PRECISION_BF16: Precision
PRECISION_FP32: Precision
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_LINEAR: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule
PLACEMENT_STRATEGY_UNSPECIFIED: PlacementStrategy
PLACEMENT_STRATEGY_PACK: PlacementStrategy
PLACEMENT_STRATEGY_SPREAD: PlacementStrategy
PLACEMENT_STRATEGY_STRICT_PACK: PlacementStrategy
PLACEMENT_STRATEGY_STRICT_SPREAD: PlacementStrategy
COMPILE_BACKEND_UNSPECIFIED: CompileBackend
COMPILE_BACKEND_INDUCTOR: CompileBackend
COMPILE_BACKEND_AOT_EAGER: CompileBackend

class TrainingSpec(_message.Message):
    __slots__ = ("base_model", "instance_prompt", "identifier", "class_prompt", "num_class_images", "prior_loss_weight", "class_image_inference_steps", "class_image_guidance_scale", "resolution", "max_steps", "learning_rate", "lr_schedule", "lr_warmup_steps", "batch_size", "gradient_accumulation_steps", "max_grad_norm", "adam_weight_decay", "train_text_encoder", "gradient_checkpointing", "precision", "seed", "zero_stage", "offload_optimizer", "offload_params", "checkpoint_interval", "checkpoints_to_keep", "async_checkpointing", "validation_prompts", "validation_interval", "validation_inference_steps", "validation_images_per_prompt", "num_workers", "gpus_per_worker", "cpus_per_worker", "placement_strategy", "max_failures", "torch_compile", "compile_backend", "cuda_graphs")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ADAM_WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_TO_KEEP_FIELD_NUMBER: _ClassVar[int]
    ASYNC_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TORCH_COMPILE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    instance_prompt: str
    identifier: str
    class_prompt: str
    num_class_images: int
    prior_loss_weight: float
    class_image_inference_steps: int
    class_image_guidance_scale: float
    resolution: int
    max_steps: int
    learning_rate: float
    lr_schedule: LrSchedule
    lr_warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    adam_weight_decay: float
    train_text_encoder: bool
    gradient_checkpointing: bool
    precision: Precision
    seed: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    checkpoint_interval: int
    checkpoints_to_keep: int
    async_checkpointing: bool
    validation_prompts: _containers.RepeatedScalarFieldContainer[str]
    validation_interval: int
    validation_inference_steps: int
    validation_images_per_prompt: int
    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    placement_strategy: PlacementStrategy
    max_failures: int
    torch_compile: bool
    compile_backend: CompileBackend
    cuda_graphs: bool
    def __init__(self, base_model: _Optional[str] = ..., instance_prompt: _Optional[str] = ..., identifier: _Optional[str] = ..., class_prompt: _Optional[str] = ..., num_class_images: _Optional[int] = ..., prior_loss_weight: _Optional[float] = ..., class_image_inference_steps: _Optional[int] = ..., class_image_guidance_scale: _Optional[float] = ..., resolution: _Optional[int] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_schedule: _Optional[_Union[LrSchedule, str]] = ..., lr_warmup_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., adam_weight_decay: _Optional[float] = ..., train_text_encoder: _Optional[bool] = ..., gradient_checkpointing: _Optional[bool] = ..., precision: _Optional[_Union[Precision, str]] = ..., seed: _Optional[int] = ..., zero_stage: _Optional[int] = ..., offload_optimizer: _Optional[bool] = ..., offload_params: _Optional[bool] = ..., checkpoint_interval: _Optional[int] = ..., checkpoints_to_keep: _Optional[int] = ..., async_checkpointing: _Optional[bool] = ..., validation_prompts: _Optional[_Iterable[str]] = ..., validation_interval: _Optional[int] = ..., validation_inference_steps: _Optional[int] = ..., validation_images_per_prompt: _Optional[int] = ..., num_workers: _Optional[int] = ..., gpus_per_worker: _Optional[float] = ..., cpus_per_worker: _Optional[float] = ..., placement_strategy: _Optional[_Union[PlacementStrategy, str]] = ..., max_failures: _Optional[int] = ..., torch_compile: _Optional[bool] = ..., compile_backend: _Optional[_Union[CompileBackend, str]] = ..., cuda_graphs: _Optional[bool] = ...) -> None: ...

class InstanceImage(_message.Message):
    __slots__ = ("data", "uri", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    uri: str
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., uri: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "instance_images", "request_id", "priority")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    spec: TrainingSpec
    instance_images: _containers.RepeatedCompositeFieldContainer[InstanceImage]
    request_id: str
    priority: int
    def __init__(self, spec: _Optional[_Union[TrainingSpec, _Mapping]] = ..., instance_images: _Optional[_Iterable[_Union[InstanceImage, _Mapping]]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "prior_loss", "learning_rate", "steps_per_second", "eta", "class_images_done", "class_images_total")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    prior_loss: float
    learning_rate: float
    steps_per_second: float
    eta: _duration_pb2.Duration
    class_images_done: int
    class_images_total: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., prior_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., steps_per_second: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., class_images_done: _Optional[int] = ..., class_images_total: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "tenant", "state", "priority", "spec", "progress", "failure", "model_id", "last_checkpoint_step", "attempts", "create_time", "start_time", "end_time", "update_time", "request_id", "queued")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    state: State
    priority: int
    spec: TrainingSpec
    progress: Progress
    failure: Failure
    model_id: str
    last_checkpoint_step: int
    attempts: int
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    request_id: str
    queued: Queued
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., priority: _Optional[int] = ..., spec: _Optional[_Union[TrainingSpec, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., model_id: _Optional[str] = ..., last_checkpoint_step: _Optional[int] = ..., attempts: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[State]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[State, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CheckpointSaved(_message.Message):
    __slots__ = ("step", "path", "stall_seconds", "waited_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    stall_seconds: float
    waited_seconds: float
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ..., stall_seconds: _Optional[float] = ..., waited_seconds: _Optional[float] = ...) -> None: ...

class ValidationImages(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job", "time", "state", "progress", "checkpoint", "validation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    job: Job
    time: _timestamp_pb2.Timestamp
    state: State
    progress: Progress
    checkpoint: CheckpointSaved
    validation: ValidationImages
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[State, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSaved, _Mapping]] = ..., validation: _Optional[_Union[ValidationImages, _Mapping]] = ...) -> None: ...

class GetJobLogsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobLogsResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
