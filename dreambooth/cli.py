"""The `dreambooth` command line.

dreambooth tiny-model OUT_DIR          write the tiny random Stable Diffusion model (offline)
dreambooth train JOB.yaml              run a training job on a local Ray (or --address) with progress bars
dreambooth demo                        the whole system on a made-up subject, offline: train, deploy, generate
dreambooth up | down | status          the local stack: Ray, the controller and Serve, in the background

On a controller (--controller HOST:PORT, --token; defaults: $DREAMBOOTH_CONTROLLER, $DREAMBOOTH_TOKEN):
dreambooth submit JOB.yaml [--watch]   queue a job (its photos are uploaded); prints its id
dreambooth jobs [--state S]            the jobs, newest first
dreambooth watch JOB                   follow a job; exits 0 when it succeeds, 1 when it fails or is cancelled,
                                       3 when it stopped following (the controller lost): the job goes on
dreambooth cancel JOB | delete JOB | logs JOB
dreambooth models | deploy MODEL | undeploy MODEL | delete-model MODEL | generate MODEL PROMPT
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import sys
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth import stack
from dreambooth.errors import PLACEMENT_TIMEOUT_S, InputError
from dreambooth.paths import path_argument

if TYPE_CHECKING:
    from tqdm import tqdm

    from dreambooth.client import ClientError, DreamBoothClient
    from dreambooth.v1 import jobs_pb2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreambooth", description="DreamBooth fine-tuning at cluster scale.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="write a tiny random Stable Diffusion model (for tests and demos)")
    tiny.add_argument("out_dir", type=path_argument)
    tiny.add_argument("--seed", type=int, help=f"the weights' seed (default: {TINY_MODEL_SEED})")

    train = commands.add_parser("train", help="run a training job on Ray and wait for its model")
    train.add_argument("spec", type=path_argument, help="job spec, YAML or JSON")
    train.add_argument(
        "--storage",
        type=path_argument,
        default=Path("dreambooth-data"),
        help="storage root, on a cluster one file system at the same path on every node (default: %(default)s)",
    )
    train.add_argument("--job-id", help="default: the spec file's name; the same id resumes from its last checkpoint")
    train.add_argument("--address", help="Ray cluster to join (e.g. 'auto'); default: start a private local one")

    _add_stack_commands(commands)

    # Its options are the controller's own (controller/server.py), passed through as they are.
    commands.add_parser(
        "controller", help="run the gRPC controller (see `dreambooth controller --help`)", add_help=False
    )

    _add_remote_commands(commands)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["controller"]:  # its own options, its own usage
        from controller.server import main as controller_main

        return controller_main(argv[1:])
    args, rest = parser.parse_known_args(argv)
    if rest:  # a misspelt option: its command's usage, not the list of every command
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args) if hasattr(args, "run") else _LOCAL[args.command](args)
    except InputError as e:
        print(f"error: {e.field}: {e.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dreambooth jobs --json | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else flushing at exit fails again
        return 0
    except OSError as e:  # a file or directory the command was pointed at (exists, unreadable, ...)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # what was started has been stopped by then (the commands clean up in finally)
        print("interrupted", file=sys.stderr)
        return 130


def _add_stack_commands(commands: argparse._SubParsersAction) -> None:
    # How to start a stack: `up`'s options, and the demo's, which starts one when none is running.
    starting = argparse.ArgumentParser(add_help=False)
    for name, use in stack.PORT_USES.items():
        default = getattr(stack.Ports(), name)
        starting.add_argument(
            f"--{name.replace('_', '-')}-port",
            type=_port,
            metavar="PORT",
            help=f"{use} (default: {default}, or for the demo a free one where it is taken; 0: a free one)",
        )
    starting.add_argument(
        "--storage", type=path_argument, help="storage root (default: the last stack's in DIR, else DIR/storage)"
    )
    starting.add_argument("--num-cpus", type=_cpu_count, help="CPUs Ray hands out, 1 or more (default: this machine's)")

    def stack_dir(command: argparse.ArgumentParser, *options: str) -> None:
        command.add_argument(
            *options,
            dest="stack_dir",
            type=path_argument,
            default=stack.DEFAULT_DIR,
            metavar="DIR",
            help="the stack's directory (default: %(default)s)",
        )

    up = commands.add_parser("up", parents=[starting], help="start the local stack: Ray, the controller, Serve")
    stack_dir(up, "--dir")
    stack_dir(commands.add_parser("down", help="stop the local stack (its storage stays)"), "--dir")
    stack_dir(commands.add_parser("status", help="each component of the local stack, up or down"), "--dir")

    demo = commands.add_parser(
        "demo",
        parents=[starting],
        help="the whole system on a made-up subject, offline: train, deploy, generate",
        description="The whole system on a made-up subject, offline: train, deploy, generate. A stack already running "
        "in DIR is used as it is: the options that start one (--storage, --num-cpus, the ports) do not apply to it.",
    )
    demo.add_argument(
        "--out", type=path_argument, default=Path("out/demo"), help="output folder (default: %(default)s)"
    )
    demo.add_argument(
        "--base-model",
        type=path_argument,
        help="real Stable Diffusion weights (diffusers format); default: the tiny model",
    )
    stack_dir(demo, "--dir", "--stack-dir")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack up when done")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def _cpu_count(text: str) -> int:
    """At least one: a stack with none trains nothing (and 0 was taken as "not given": every CPU of the machine)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: the stack needs at least 1 CPU to train and serve on")
    return count


def _add_remote_commands(commands: argparse._SubParsersAction) -> None:
    # Options of every command that talks to a controller. Their env/default fallbacks are applied in _remote,
    # so that only these commands import the gRPC client.
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--controller", metavar="HOST:PORT", help="default: $DREAMBOOTH_CONTROLLER or 127.0.0.1:50051")
    remote.add_argument("--token", help="bearer token (default: $DREAMBOOTH_TOKEN)")
    remote.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA certificate, or 'system' for the system's trusted CAs: use TLS (default: $DREAMBOOTH_TLS_CA)",
    )

    def add(
        name: str, run: Callable[[DreamBoothClient, argparse.Namespace], int], summary: str
    ) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[remote], help=summary)
        command.set_defaults(run=_remote(run))
        return command

    submit = add("submit", _submit, "queue a training job on the controller; prints its id")
    submit.add_argument("spec", type=path_argument, help="job spec, YAML or JSON")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first among your queued jobs, -1000..1000")
    submit.add_argument(
        "--request-id",
        help="idempotency key: submitting the same request again with it (after a timeout, say) returns the job the "
        "first submission queued instead of queueing another; another spec, priority or photos under a used key is "
        "refused (default: a new one each time, printed where a failed submission may have queued the job)",
    )
    submit.add_argument("--watch", action="store_true", help="then follow it, like `dreambooth watch`")
    submit.add_argument(
        "--no-upload", action="store_true", help="send the photos' paths, not their bytes (storage shared with it)"
    )
    jobs = add("jobs", _jobs, "list jobs, newest first")
    jobs.add_argument("--state", action="append", help="only jobs in this state (repeatable), e.g. TRAINING")
    jobs.add_argument("--json", action="store_true", help="one JSON object per job and line (the API's Job)")
    add("watch", _watch, "follow a job until it ends").add_argument("job_id")
    add("cancel", _cancel, "stop a queued or running job").add_argument("job_id")
    add(
        "delete", _delete, "delete an ended job and its files (checkpoints, photos); a model recorded stays"
    ).add_argument("job_id")
    add("logs", _logs, "print a job's training log").add_argument("job_id")
    models = add("models", _models, "list the trained models")
    models.add_argument("--json", action="store_true", help="one JSON object per model and line (the API's Model)")
    deploy = add("deploy", _deploy, "serve a trained model over HTTP; prints its endpoint")
    deploy.add_argument("model_id")
    deploy.add_argument("--no-wait", action="store_true", help="return at once, before the HTTP API lists it")
    add("undeploy", _undeploy, "stop serving a model").add_argument("model_id")
    add("delete-model", _delete_model, "delete a model and its files (undeploy it first)").add_argument("model_id")
    generate = add("generate", _generate, "generate images of a deployed model into PNG files")
    generate.add_argument("model_id")
    generate.add_argument("prompt", help='use the identifier, e.g. "a photo of sks dog on the beach"')
    generate.add_argument("--out", type=path_argument, default=Path("."), help="directory for the PNGs (default: .)")
    generate.add_argument("--num-images", type=int, default=1, help="image i is drawn from seed + i (default: 1)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the serving API's)")
    generate.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the serving API's)")
    generate.add_argument("--seed", type=int, default=0, help="the same seed draws the same image (default: 0)")
    generate.add_argument("--negative-prompt", default="", help="what to steer away from")
    generate.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the size it was trained at)")
    generate.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the size it was trained at)")


TINY_MODEL_SEED = 0  # build_tiny_model's
WATCH_LOST = 3  # watch's exit status when it stopped following: the job's end is unknown

# gRPC codes that mean "your request is wrong" (like a bad spec locally) rather than "something failed".
_USER_ERRORS = frozenset(
    {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED"}
)


def _remote(command: Callable[[DreamBoothClient, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `command` with a client for the controller; gRPC errors become `error: CODE: message`."""

    def run(args: argparse.Namespace) -> int:
        # gRPC's own log lines (a failed TLS handshake's, one per retry) came before the one line that says what to
        # fix; an operator may still ask for them.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from dreambooth.client import ClientError, DreamBoothClient
        from dreambooth.serving_client import ServingError, ServingUnreachable

        try:
            # The client falls back to $DREAMBOOTH_CONTROLLER, $DREAMBOOTH_TOKEN and $DREAMBOOTH_TLS_CA.
            client = DreamBoothClient(args.controller, args.token, tls_ca=args.tls_ca)
            with client:
                return command(client, args)
        except ClientError as e:
            print(_client_error_line(client, e), file=sys.stderr)
            return 2 if e.code in _USER_ERRORS else 1
        except BrokenPipeError:  # stdout's reader went away: main's to handle, not an unreadable file
            raise
        except ServingError as e:  # the serving API answered no (generate; deploy's wait for the model)
            print(f"error: {e}", file=sys.stderr)
            # A 429 is the tenant's requests in progress, a 408 a body stalled on its way, not the input: the same
            # command may succeed later.
            return 2 if 400 <= e.status < 500 and e.status not in (408, 429) else 1
        except (TimeoutError, urllib.error.URLError, ServingUnreachable) as e:  # not reached, not serving, or too slow
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # an unreadable file: --tls-ca, a photo
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C while watching, say: what the controller was asked stands
            following = args.command == "watch" or getattr(args, "watch", False)
            print(
                "interrupted (jobs go on: `dreambooth watch JOB` follows one again)" if following else "interrupted",
                file=sys.stderr,
            )
            return 130

    return run


# What gRPC says when a plaintext client reaches a server that speaks TLS (or something else that is not gRPC).
_NOT_PLAINTEXT_GRPC = ("Socket closed", "Connection reset", "Failed parsing HTTP/2")


def _client_error_line(client: DreamBoothClient, e: ClientError) -> str:
    """What to print for a failed call: where the controller could not be reached, how to fix that."""
    target = client.target
    connecting = e.failed_to_connect
    # A peer whose first bytes are text ("HTTP/1.1 400 ..." read as an HTTP/2 frame of type 'P'): a plaintext server
    # of another protocol, not TLS (whose bytes are not text), and not a controller.
    if connecting and (frame := re.search(r"got frame type (\d+)", e.message)) and 32 <= int(frame[1]) < 127:
        return (
            f"error: an HTTP server (or another that is not gRPC) answers at {target}, not the controller: Serve's API "
            f"and Ray's dashboard are HTTP; the controller listens on 50051 unless told otherwise (`dreambooth status` "
            f"lists a local stack's addresses) ({e.message})"
        )
    if connecting and "Hostname Verification" in e.message:
        return (
            f"error: the controller's certificate does not name {target.rpartition(':')[0]}: connect by a name or "
            f"address it lists (a port-forward to localhost needs a certificate that names localhost) ({e.message})"
        )
    if connecting and "ALPN" in e.message:
        return (
            f"error: a TLS server that does not speak gRPC answers at {target} (an HTTPS server or proxy), not the "
            f"controller ({e.message})"
        )
    if connecting and client.tls_ca is None and any(m in e.message for m in _NOT_PLAINTEXT_GRPC):
        return (
            f"error: something at {target} took the connection and closed it: a controller serving TLS (give the CA "
            f"that signed its certificate with --tls-ca CA.pem, or --tls-ca system for a publicly signed one, or "
            f"$DREAMBOOTH_TLS_CA), or a proxy with no controller behind it (a port-forward, a container's published "
            f"port, a load balancer) ({e.message})"
        )
    if e.code == "UNAVAILABLE" and "handshake" in e.message.lower():
        return (
            f"error: TLS with the controller at {target} failed: --tls-ca (or $DREAMBOOTH_TLS_CA) names a CA for a "
            f"controller that serves plaintext, or not the CA that signed its certificate ({e.message})"
        )
    if connecting:
        return (
            f"error: no controller answers at {target}: start one with `dreambooth up`, or name it with --controller "
            f"HOST:PORT or $DREAMBOOTH_CONTROLLER ({e.message})"
        )
    if e.code == "UNAUTHENTICATED":
        given = "$DREAMBOOTH_TOKEN, which is set" if os.environ.get("DREAMBOOTH_TOKEN") else "$DREAMBOOTH_TOKEN"
        return f"error: {e.code}: {e.message} (the token: --token or {given})"
    return f"error: {e.code}: {e.message}"


# A submission that ends with these may have been queued all the same: the connection dropped after the controller
# recorded it (then restarted within the SDK's retries), or its answer came after the deadline. Not one that never
# reached a controller (ClientError.never_sent).
_MAYBE_QUEUED = frozenset({"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"})


def _submit(client: DreamBoothClient, args: argparse.Namespace) -> int:
    from dreambooth.client import ClientError

    request_id = args.request_id or str(uuid.uuid4())  # the SDK's default, made here so that a failure can name it
    again = (
        f"if the controller got the submission before that, the job is queued: run this command again with "
        f"`--request-id {request_id}`, which returns that job, or queues the job if it was not"
    )
    try:
        job = client.submit(args.spec, priority=args.priority, upload=not args.no_upload, request_id=request_id)
    except ClientError as e:
        if e.code not in _MAYBE_QUEUED or e.never_sent:
            raise
        print(_client_error_line(client, e), file=sys.stderr)
        print(again, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # during a slow upload, say: the same command again would queue a second job
        print(f"interrupted; {again}", file=sys.stderr)
        return 130
    print(job.job_id, flush=True)  # alone on stdout, for JOB=$(dreambooth submit job.yaml)
    return _follow(client, job.job_id) if args.watch else 0


def _jobs(client: DreamBoothClient, args: argparse.Namespace) -> int:
    from dreambooth.proto_convert import state_name

    if args.json:
        return _print_json_lines(client.list(states=args.state))
    rows = []
    for job in client.list(states=args.state):
        p = job.progress
        rows.append(
            (
                job.job_id,
                state_name(job.state),
                f"{p.step}/{p.total_steps}" if p.total_steps else "-",
                f"{p.loss:.4f}" if p.step else "-",
                _age(job.create_time.ToSeconds()),
            )
        )
    _print_table(("ID", "STATE", "STEP", "LOSS", "AGE"), rows)
    return 0


def _watch(client: DreamBoothClient, args: argparse.Namespace) -> int:
    return _follow(client, args.job_id)


def _cancel(client: DreamBoothClient, args: argparse.Namespace) -> int:
    from dreambooth.proto_convert import state_name

    job = client.cancel(args.job_id)
    print(f"{job.job_id} {state_name(job.state)}")
    return 0


def _delete(client: DreamBoothClient, args: argparse.Namespace) -> int:
    client.delete(args.job_id)
    print(f"{args.job_id} deleted")
    return 0


def _logs(client: DreamBoothClient, args: argparse.Namespace) -> int:
    text = client.logs(args.job_id)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


def _models(client: DreamBoothClient, args: argparse.Namespace) -> int:
    if args.json:
        return _print_json_lines(client.models())
    rows = [
        (m.model_id, m.job_id, "yes" if m.deployed else "no", m.endpoint or "-", _age(m.create_time.ToSeconds()))
        for m in client.models()
    ]
    _print_table(("ID", "JOB", "DEPLOYED", "ENDPOINT", "AGE"), rows)
    return 0


def _print_json_lines(messages) -> int:
    """For scripts: each message as the API's JSON (proto3's mapping, field names as in the .proto)."""
    from google.protobuf.json_format import MessageToJson

    for message in messages:
        print(MessageToJson(message, preserving_proto_field_name=True, indent=None))
    return 0


def _deploy(client: DreamBoothClient, args: argparse.Namespace) -> int:
    from dreambooth.serving_client import ServingHostUnknown, wait_until_served

    model = client.deploy(args.model_id)
    if not args.no_wait:
        print(f"waiting for the serving API to list {model.model_id} at {model.endpoint} ...", file=sys.stderr)
        try:
            wait_until_served(model.endpoint, token=client.token, tls_ca=client.tls_ca)
        except ServingHostUnknown as e:  # the deploy stands: what fails is this machine's view of its address
            print(
                f"error: {model.model_id} is deployed, but {e}: does the controller's serving.public_url name an "
                "address for inside the cluster? (--no-wait skips this check)",
                file=sys.stderr,
            )
            return 1
    print(model.endpoint)
    return 0


def _undeploy(client: DreamBoothClient, args: argparse.Namespace) -> int:
    client.undeploy(args.model_id)
    print(f"{args.model_id} undeployed")
    return 0


def _delete_model(client: DreamBoothClient, args: argparse.Namespace) -> int:
    client.delete_model(args.model_id)
    print(f"{args.model_id} deleted")
    return 0


def _generate(client: DreamBoothClient, args: argparse.Namespace) -> int:
    from dreambooth.serving_client import generate

    model = client.model(args.model_id)
    if not model.deployed:
        print(f"error: model {args.model_id} is not deployed: run `dreambooth deploy {args.model_id}`", file=sys.stderr)
        return 2
    if not model.endpoint:  # deployed, on a controller whose `serving:` section was removed since
        print(f"error: model {args.model_id} is served nowhere: its controller has no serving", file=sys.stderr)
        return 1
    _output_dir(args.out)  # before the GPU work: a file there, or a folder not writable, lost the images after it
    options = {"num_images": args.num_images, "seed": args.seed, "negative_prompt": args.negative_prompt}
    # Unset, the serving API's defaults apply (one place for them: serving/http_api.GenerateBody).
    optional = ("steps", "guidance_scale", "width", "height")
    options |= {name: getattr(args, name) for name in optional if getattr(args, name) is not None}
    images = generate(model.endpoint, args.prompt, token=client.token, tls_ca=client.tls_ca, **options)
    # The name tells requests apart (another prompt with the same seed must not overwrite these); the same
    # request draws the same image, so it may.
    request = hashlib.sha256(json.dumps([args.prompt, options], sort_keys=True).encode()).hexdigest()[:8]
    for image in images:
        path = args.out / f"{args.model_id}-{request}-{image.seed}.png"
        path.write_bytes(image.png)
        print(path)
    return 0


def _output_dir(path: Path) -> None:
    """generate's --out, made where it is not, and checked writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError("out", f"{path} is a file: give a directory for the PNGs (made if need be)") from None
    except OSError as e:  # a file on the way, a folder not writable
        raise InputError("out", f"{path}: cannot make the directory ({e.strerror}): give another") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError("out", f"{path}: this user cannot write in it: give another directory")


def _follow(client: DreamBoothClient, job_id: str) -> int:
    """Progress bars (class images, then training steps with loss and the server's ETA) and a line per state
    change, until the job ends. 0 when it SUCCEEDED, 1 when it ended otherwise, WATCH_LOST when it stopped following
    a job whose end it does not know."""
    from tqdm import tqdm

    from dreambooth.client import ClientError
    from dreambooth.proto_convert import state_name

    bars = _ProgressBars()
    job: jobs_pb2.Job | None = None
    try:
        for update in client.watch(job_id):
            previous, job = job, update.job
            if previous is None or (previous.state, previous.queued) != (job.state, job.queued):
                tqdm.write(_state_line(job), file=sys.stderr)
            p = job.progress
            if p.class_images_total:
                bars.class_images(p.class_images_done, p.class_images_total)
            if p.total_steps and (p.step or bars.training_started):  # from the first progress report (loss, ETA) on
                bars.training(p.step, p.total_steps, p.loss, p.eta.ToSeconds() if p.HasField("eta") else None)
            change = update.WhichOneof("change")
            if change == "checkpoint":
                c = update.checkpoint
                tqdm.write(_checkpoint_line(c.step, c.path, c.waited_seconds), file=sys.stderr)
            elif change == "validation":
                tqdm.write(f"validation at step {update.validation.step}: {update.validation.path}", file=sys.stderr)
    except ClientError as e:
        if e.code in _USER_ERRORS:  # no such job, not the caller's: a mistake to fix
            raise
        # The controller gone for minutes (an upgrade), or too many watches open: the job's end is unknown, and
        # 1 would tell a script it failed (and to run it again, beside the first).
        bars.close()  # before the message, which would print under a bar
        # Never told of the job (the controller restarting, or a wrong address: they look alike), its end is unknown
        # all the same: 1 would have a script run it again beside itself.
        what = (
            f"stopped following it while it was {state_name(job.state)}" if job is not None else "could not follow it"
        )
        print(_client_error_line(client, e), file=sys.stderr)
        print(f"{job_id}: {what}; `dreambooth watch {job_id}` follows it again", file=sys.stderr)
        return WATCH_LOST
    finally:
        bars.close()
    state = state_name(job.state)  # an ended state: the client's watch goes on (reconnecting) until then
    if state == "SUCCEEDED":
        print(f"{job.job_id} SUCCEEDED: model {job.model_id}")
        return 0
    failure = f": {job.failure.reason}: {job.failure.message}" if job.HasField("failure") else ""
    print(f"{job.job_id} {state}{failure}")
    return 1


def _state_line(job: jobs_pb2.Job) -> str:
    """A job's new state, and while it is queued what it waits for (the controller says)."""
    from dreambooth.proto_convert import state_name

    line = f"[{state_name(job.state)}]"
    if job.HasField("queued"):
        line += f" {job.queued.message}"
    return line


def _checkpoint_line(step: int, path: str, waited_s: float) -> str:
    """A committed checkpoint, and the user's lever when training waited for the one before to be written."""
    line = f"checkpoint at step {step}: {path}"
    if waited_s >= 1:
        line += (
            f" (training waited {waited_s:.1f} s for the previous checkpoint to be written: a longer "
            "checkpoint_interval avoids the wait)"
        )
    return line


class _ProgressBars:
    """A job's progress bars on stderr: class images, then training steps with the loss and the trainer's ETA (not
    tqdm's, which would only know the rate since this watch started). Fed by the controller's Job messages (watch)
    or by the trainer's events (train)."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self):
        self.bars: dict[str, tqdm | _ProgressLines] = {}

    @property
    def training_started(self) -> bool:
        return "training" in self.bars

    def class_images(self, done: int, total: int) -> None:
        bar = self._bar("class images", total, "img")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()  # its last line stays; the training bar below is then the only live one (closed: no redraws)

    def training(self, step: int, total: int, loss: float, eta_s: float | None) -> None:
        bar = self._bar("training", total, "step")
        bar.n = step
        eta = f", eta {_duration(eta_s)}" if eta_s is not None else ""
        bar.set_postfix_str(f"loss {loss:.4f}{eta}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def _bar(self, name: str, total: int, unit: str) -> tqdm | _ProgressLines:
        from tqdm import tqdm

        if name not in self.bars:
            if sys.stderr.isatty():
                self.bars[name] = tqdm(
                    total=total, desc=name, unit=unit, bar_format=self.FORMAT, dynamic_ncols=True, file=sys.stderr
                )
            else:
                self.bars[name] = _ProgressLines(name, total, unit)
        return self.bars[name]


class _ProgressLines:
    """A progress bar where stderr is no terminal (a log file, CI): a line at most every LINE_INTERVAL_S and at the end;
    tqdm wrote a frame per update, each after a carriage return, into one line that grew for as long as the job ran."""

    LINE_INTERVAL_S = 30.0

    def __init__(self, desc: str, total: int, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n, self.postfix = 0, ""
        self._told: tuple[int, str] | None = None
        self._last = -float("inf")

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def refresh(self) -> None:
        if self.n >= self.total or time.monotonic() - self._last >= self.LINE_INTERVAL_S:
            self._tell()

    def close(self) -> None:
        self._tell()

    def _tell(self) -> None:
        if self._told != (self.n, self.postfix):
            postfix = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{postfix}", file=sys.stderr, flush=True)
            self._told, self._last = (self.n, self.postfix), time.monotonic()


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _age(epoch_seconds: int) -> str:
    return _duration(time.time() - epoch_seconds) if epoch_seconds else "-"


def _duration(seconds: float) -> str:
    """Compact, like kubectl: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _tiny_model(args) -> int:
    from dreambooth.tiny_model import build_tiny_model, holds_model, recorded_seed

    out, seed = args.out_dir, TINY_MODEL_SEED if args.seed is None else args.seed
    # A model already there is kept as it is: said, so that it is not taken for the one asked for.
    if holds_model(out):
        kept = recorded_seed(out)
        if kept is None:  # real weights, or a tiny model written before seeds were recorded
            print(f"kept the model already in {out}; its seed is not recorded and may not be {seed}", file=sys.stderr)
        elif args.seed is not None and kept != args.seed:
            raise InputError("seed", f"{out} holds the tiny model of seed {kept}: remove it to write seed {args.seed}")
        else:
            print(f"kept the tiny model of seed {kept} already in {out}", file=sys.stderr)
    print(build_tiny_model(out, seed=seed))
    return 0


def _train(args) -> int:
    from trainer.spec import JobSpec

    spec = JobSpec.load(args.spec)
    job_id = args.job_id or _job_id_from_file_name(args.spec)
    again = shlex.join(["dreambooth", "train", str(args.spec), "--storage", str(args.storage), "--job-id", job_id])
    resumes = f"`{again}` resumes it from its last checkpoint"
    try:
        _run_with_progress(spec, args.storage, job_id, args.address)
    except (InputError, OSError):
        raise  # main tells these
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train's handler aborts the run and exits (SystemExit 1)
        print(f"interrupted: job {job_id} stopped; {resumes}", file=sys.stderr)
        return 130
    except Exception as e:  # training failed, after Ray Train's retries: what failed, not a page of traceback
        from trainer.run import RayLostTheRun  # loaded by then

        print(
            f"error: {e}; {resumes}" if isinstance(e, RayLostTheRun) else f"error: training failed: {e}",
            file=sys.stderr,
        )
        return 1
    return 0


def _job_id_from_file_name(spec_file: Path) -> str:
    """train's job id without --job-id: the spec file's name, which may be no job id ("my job.yaml")."""
    from trainer.storage import check_job_id

    try:
        return check_job_id(spec_file.stem)
    except InputError as e:
        raise InputError("job_id", f"{e.message} (taken from the spec's file name: give --job-id ID)") from None


def _demo(args) -> int:
    from dreambooth import demo
    from dreambooth.client import ClientError
    from dreambooth.serving_client import ServingError

    options = {"base_model": args.base_model, "stack_dir": args.stack_dir, "keep_running": args.keep_running}
    try:
        # Its stack goes when it ends: a default port taken (a web server on 8000) is no reason to stop.
        return demo.run(args.out, **options, start=_start_options(args, defaults_or_free=True), follow=_follow)
    except (stack.StackError, ClientError, ServingError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _up(args) -> int:
    try:
        started = stack.up(args.stack_dir, **_start_options(args), say=lambda m: print(m, file=sys.stderr, flush=True))
    except stack.StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"the stack is up in {started.dir}:")
    _print_table(("COMPONENT", "ADDRESS"), started.addresses())
    print(_next_steps(started, args.stack_dir, os.environ))
    return 0


def _next_steps(started: stack.Stack, stack_dir: Path, environ: Mapping[str, str]) -> str:
    """What `up` prints to do next. The CLI's defaults reach the stack unless the environment names another
    controller (a production one, say): then the commands name this one, and a note says what else is set."""
    from dreambooth.client import DEFAULT_TARGET

    named = environ.get("DREAMBOOTH_CONTROLLER")
    where = "" if stack_dir == stack.DEFAULT_DIR else f" --dir {stack_dir}"
    controller = "" if started.controller == DEFAULT_TARGET and not named else f" --controller {started.controller}"
    settings = [
        name for name in ("DREAMBOOTH_CONTROLLER", "DREAMBOOTH_TOKEN", "DREAMBOOTH_TLS_CA") if environ.get(name)
    ]
    note = (
        f"note: {', '.join(settings)} set here, for another controller? unset them for this stack\n" if settings else ""
    )
    prometheus = Path(started.dir) / "prometheus.yml"
    return (
        f"\n{note}submit jobs:  dreambooth submit job.yaml --watch{controller}  (also: jobs, deploy, generate ...)\n"
        f"metrics:      prometheus --config.file={prometheus}  (scrapes the controller and Ray)\n"
        f"dashboards:   Grafana with deploy/grafana/ on that Prometheus (see deploy/README.md)\n"
        f"status, stop: dreambooth status{where}, dreambooth down{where}"
    )


def _start_options(args, defaults_or_free: bool = False) -> dict:
    """stack.up's options. A port not given is its default's (`up`: the CLI's defaults find the stack there), or
    with `defaults_or_free` a free one where the default is taken."""
    given = {name: getattr(args, f"{name}_port") for name in stack.PORT_USES}
    defaults = stack.Ports()
    ports = {
        name: port if port is not None or defaults_or_free else getattr(defaults, name) for name, port in given.items()
    }
    return {"ports": stack.Ports(**ports), "storage": args.storage, "num_cpus": args.num_cpus}


def _down(args) -> int:
    try:
        stopped = stack.down(args.stack_dir)
    except stack.StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"stopped the stack in {stopped.dir}; its storage stays in {stopped.storage}"
        if stopped
        else f"no stack in {args.stack_dir}"
    )
    return 0


def _status(args) -> int:
    try:
        current = stack.load(args.stack_dir)
    except stack.StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if current is None:
        print(f"no stack in {args.stack_dir}: start one with `dreambooth up`")
        return 1
    components = stack.health(current)
    _print_table(
        ("COMPONENT", "STATE", "ADDRESS", "DETAIL"),
        [(c.name, "up" if c.up else "DOWN", c.address, c.detail) for c in components],
    )
    print(f"started {_age(current.started_at)} ago; storage {current.storage}; logs {Path(current.dir) / 'logs'}")
    return 0 if all(c.up for c in components) else 1


def _run_with_progress(spec, storage: Path, job_id: str, address: str | None):
    # What the training libraries print as they load (DeepSpeed's accelerator line) and run: stdout is for the
    # result's line.
    with stdout_to_stderr():
        result = _checked_and_run(spec, storage, job_id, address)
    print(
        f"model: {result.model_dir}  ({result.steps} steps, loss {result.final_loss:.4f}, {result.wall_time_s:.0f} s)"
    )
    return result


def _checked_and_run(spec, storage: Path, job_id: str, address: str | None):
    from trainer.preflight import preflight
    from trainer.storage import job_paths

    paths = job_paths(storage, job_id)
    # A rerun's checks refuse only what changed since its job ran: an older release may have taken the rest.
    spec.validate_new(ran_with=json.loads(paths.spec_file.read_text()) if paths.spec_file.exists() else None)
    preflight(spec)  # before Ray, DeepSpeed and the rest of training load

    from dreambooth.local_ray import init_ray
    from trainer.run import check_rerun, only_export_left, run_training

    check_rerun(spec, paths)  # before Ray starts: it needs only the job's folder
    print(f"job {paths.job_id}: {paths.job_dir}", file=sys.stderr)
    init_ray(address)
    if only_export_left(spec, paths) is None:  # an export runs here, on CPUs: a GPU job trained elsewhere exports
        _check_cluster_fits(spec, started_here=address is None)
    stop = threading.Event()
    start_offset = paths.events_file.stat().st_size if paths.events_file.exists() else 0
    viewer = threading.Thread(target=show_progress, args=(paths.events_file, stop, start_offset), daemon=True)
    viewer.start()
    try:
        return run_training(spec, paths)
    finally:
        stop.set()
        viewer.join(timeout=5)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """What this process (Python or not) writes to stdout goes to stderr meanwhile."""
    if sys.stdout is None:  # started with stdout closed: nothing of its to move (and fd 1 may be another file now)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # what writes to the descriptor (C, and Python's streams made before: DeepSpeed's logger's)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # print()
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _check_cluster_fits(spec, started_here: bool) -> None:
    """Ray holds a job whose workers need more than the cluster has until it grows, saying nothing here. The Ray
    this command started never grows: refused. Another may (an autoscaler): warned."""
    import ray

    from controller.scheduler import Resources, demand, shortfalls

    has = ray.cluster_resources()
    for short in shortfalls(demand(spec.to_dict()), Resources(has.get("CPU", 0.0), has.get("GPU", 0.0))):
        message = f"the job needs {short.needs} and the Ray cluster has {short.available:g}{short.hint}"
        if started_here:
            raise InputError(short.field, message)
        print(
            f"warning: {short.field}: {message}; the job fails unless the cluster has them within "
            f"{PLACEMENT_TIMEOUT_S / 60:g} min",
            file=sys.stderr,
        )


def show_progress(events_file: Path, stop: threading.Event, offset: int = 0) -> None:
    """Render a job's events as progress bars: class images, then training steps with loss and ETA."""
    from tqdm import tqdm

    from trainer.events import follow_events

    bars = _ProgressBars()
    for event in follow_events(events_file, stop, offset=offset):
        kind = event["type"]
        if kind == "class_images":
            bars.class_images(event["done"], event["total"])
        elif kind == "progress":
            bars.training(event["step"], event["total_steps"], event["loss"], event.get("eta_s"))
        elif kind == "state":
            tqdm.write(
                f"[{event['state']}]" + (f" {event.get('message', '')}" if event["state"] == "FAILED" else ""),
                file=sys.stderr,
            )
        elif kind == "compiled":
            line = f"torch.compile: first step {event['seconds']:.1f} s ({event['graphs']} graphs)"
            if skips := event.get("cudagraph_skips"):
                line += f"; {skips} not replayed as CUDA graphs: slower steps (TORCH_LOGS=perf_hints says why)"
            tqdm.write(line, file=sys.stderr)
        elif kind == "checkpoint":
            tqdm.write(_checkpoint_line(event["step"], event["path"], event.get("waited_s", 0.0)), file=sys.stderr)
        elif kind in ("validation", "resumed"):
            tqdm.write(
                f"{kind} at step {event['step']}" + (f": {event['path']}" if "path" in event else ""), file=sys.stderr
            )
    bars.close()


_LOCAL = {"tiny-model": _tiny_model, "train": _train, "demo": _demo, "up": _up, "down": _down, "status": _status}


if __name__ == "__main__":
    sys.exit(main())
