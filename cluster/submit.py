"""Ray Jobs API submission: ``framecast submit train|status|logs|stop``.

A training run on a Ray cluster is a Ray *job*: the repository is uploaded as the job's
``working_dir`` (minus virtualenvs, caches, git data and shipped models), optional pinned
``pip`` requirements are installed by Ray's runtime_env machinery, and the entrypoint is
``python -m cluster.cli train ...`` -- the same command a person runs locally, so there is
one training code path. The driver of that job connects to the cluster through the
``RAY_ADDRESS`` the job supervisor sets.

Token authentication (``RAY_AUTH_MODE=token``, on by default for ``ray start --head``):
the bearer token is read where Ray's own clients read it (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and sent with every request.

The address a job was submitted to is remembered under ``<home>/submit/jobs.json``, so
``submit status|logs|stop JOB_ID`` find the cluster again without ``--address``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cluster.exceptions import SubmitError, SubmitOptionError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REQUIREMENTS = REPO_ROOT / "requirements.lock"

# Never uploaded with the working_dir (gitignore-style patterns, as Ray's `excludes`).
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".venv/",
    ".framecast/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    "__pycache__/",
    "*.egg-info/",
    "build/",
    "dist/",
    "models/",
    "out/",
    "reports/",
    "helm/",
    "*.tflite",
    "*.parquet",
    "*.mp4",
)

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})  # noqa: S104 - a name, not a bind
PIP_MODES = ("auto", "none")


# A ``ray.job_submission.JobSubmissionClient`` (typed loosely: Ray's stubs are partial).
JobsClient = Any


@dataclass
class SubmitOptions:
    """What `submit train` takes besides the training flags, and those flags as arguments."""

    address: str
    train_args: list[str]
    pip: str = "auto"
    submission_id: str | None = None
    follow: bool = True
    env: dict[str, str] = field(default_factory=dict)
    working_dir: Path = REPO_ROOT
    entrypoint_num_cpus: float | None = None
    python: str | None = None


@dataclass
class JobOutcome:
    """How a followed job ended."""

    job_id: str
    status: str
    message: str | None
    artifact: str | None
    seconds: float


# -- addresses ------------------------------------------------------------------------------------


def normalize_address(address: str) -> str:
    """The Jobs API URL: ``host:port`` gets ``http://``; ``ray://`` and others are refused."""
    address = address.strip().rstrip("/")
    if not address:
        raise SubmitOptionError(
            "empty --address; give the Ray dashboard URL, e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    scheme = urlparse(address).scheme
    if scheme not in ("http", "https"):
        raise SubmitOptionError(
            f"--address {address!r}: the Jobs API is the dashboard's HTTP endpoint "
            "(http://HEAD:8265), not a GCS or ray:// client address"
        )
    return address


def is_local_address(address: str) -> bool:
    """True when the Jobs API is on this machine (the job shares our filesystem and venv)."""
    host = urlparse(normalize_address(address)).hostname or ""
    return host in LOCAL_HOSTS


# -- the submission flags -------------------------------------------------------------------------

_SUBMIT_FLAGS_WITH_VALUE = (
    "--pip",
    "--submission-id",
    "--env",
    "--entrypoint-num-cpus",
    "--python",
)
_SUBMIT_SWITCHES = ("--no-follow",)


def split_submit_args(
    address: str, args: Sequence[str], train_args: Sequence[str] = ()
) -> SubmitOptions:
    """The submission flags in args, with the (already checked) ``framecast train`` flags.

    Submission flags: ``--pip auto|none|FILE``, ``--submission-id ID``, ``--env KEY=VALUE``
    (repeatable), ``--entrypoint-num-cpus N``, ``--python EXE``, ``--no-follow``. The CLI
    parses train's flags itself (cluster/cli.py), so anything else in args is refused.
    """
    options = SubmitOptions(address=normalize_address(address), train_args=list(train_args))
    items = list(args)
    index = 0
    while index < len(items):
        item = items[index]
        name, eq, inline = item.partition("=")
        if name in _SUBMIT_SWITCHES and not eq:
            options.follow = False
            index += 1
            continue
        if name in _SUBMIT_FLAGS_WITH_VALUE:
            if eq:
                value = inline
                index += 1
            else:
                if index + 1 >= len(items):
                    raise SubmitOptionError(f"{name} needs a value")
                value = items[index + 1]
                index += 2
            _apply_submit_flag(options, name, value)
            continue
        raise SubmitOptionError(
            f"submit train: no such option {item!r} (it takes train's flags and "
            f"{', '.join((*_SUBMIT_FLAGS_WITH_VALUE, *_SUBMIT_SWITCHES))})"
        )
    return options


def _apply_submit_flag(options: SubmitOptions, name: str, value: str) -> None:
    if name == "--pip":
        options.pip = value
    elif name == "--python":
        options.python = value
    elif name == "--submission-id":
        options.submission_id = value
    elif name == "--entrypoint-num-cpus":
        try:
            options.entrypoint_num_cpus = float(value)
        except ValueError:
            raise SubmitOptionError(f"--entrypoint-num-cpus: not a number: {value!r}") from None
    else:
        key, eq, val = value.partition("=")
        if not eq or not key:
            raise SubmitOptionError(f"--env expects KEY=VALUE, got {value!r}")
        options.env[key] = val


def _option_value(args: Sequence[str], flag: str) -> str | None:
    for index, item in enumerate(args):
        if item == flag and index + 1 < len(args):
            return args[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def _replace_option(args: Sequence[str], flag: str, value: str) -> list[str]:
    out: list[str] = []
    skip = False
    for index, item in enumerate(args):
        if skip:
            skip = False
            continue
        if item == flag and index + 1 < len(args):
            out.extend([flag, value])
            skip = True
        elif item.startswith(flag + "="):
            out.append(f"{flag}={value}")
        else:
            out.append(item)
    return out


def prepare_train_args(options: SubmitOptions, cwd: Path | None = None) -> list[str]:
    """Make the training flags' ``--out`` unambiguous.

    On a local head the job runs inside an unpacked copy of the working_dir, so a relative
    ``--out`` is made absolute against *our* directory -- the artifact lands where the user
    expects it. On a remote cluster a relative path would land in a temporary directory of
    the head node, so it is refused: use a shared volume path or ``s3://``-style URI.
    """
    args = list(options.train_args)
    out = _option_value(args, "--out")
    if out is None:
        raise SubmitOptionError("framecast train needs --out DIR (where the artifact is written)")
    if "://" in out or Path(out).is_absolute():
        return args
    if is_local_address(options.address):
        return _replace_option(args, "--out", str(((cwd or Path.cwd()) / out).resolve()))
    raise SubmitOptionError(
        f"--out {out!r} is relative: on a remote cluster it would land in the job's temporary "
        "working directory on the head node. Use an absolute path on a shared volume "
        "(e.g. /mnt/artifacts/run1) or a storage URI."
    )


# -- the job --------------------------------------------------------------------------------------


def read_requirements(path: Path) -> list[str]:
    """Pinned requirement lines of a requirements/lock file, without Ray itself.

    Ray is left out on purpose: the cluster's Ray must stay the one its nodes run.
    """
    if not path.is_file():
        raise SubmitOptionError(f"--pip {path}: no such requirements file")
    packages: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("==")[0].split("[")[0].strip().lower()
        if name == "ray":
            continue
        packages.append(line)
    return packages


def build_runtime_env(options: SubmitOptions) -> dict[str, Any]:
    """The job's runtime_env: working_dir + excludes, optional pinned pip, env vars."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(options.working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
    }
    mode = options.pip
    if mode == "auto":
        mode = "none" if is_local_address(options.address) else str(DEFAULT_REQUIREMENTS)
    if mode != "none":
        runtime_env["pip"] = {"packages": read_requirements(Path(mode)), "pip_check": False}
    env = {"PYTHONUNBUFFERED": "1", **options.env}
    runtime_env["env_vars"] = env
    return runtime_env


def job_python(options: SubmitOptions) -> str:
    """The interpreter the job runs with.

    A local head shares this machine, and the job must use the project's venv (the shell's
    ``python`` may be another interpreter without TensorFlow); a cluster's nodes run their
    image's ``python``. ``--python`` overrides both.
    """
    if options.python:
        return options.python
    return sys.executable if is_local_address(options.address) else "python"


def train_entrypoint(train_args: Sequence[str], python: str = "python") -> str:
    """The shell command the job runs: the CLI's own `train`, as a module of the working_dir."""
    return shlex.join([python, "-m", "cluster.cli", "train", *train_args])


def auth_token(
    environ: dict[str, str] | None = None,
    home: Path | None = None,
    local_head_token: Path | None = None,
) -> str | None:
    """The Ray auth token the way Ray's own clients find it, or None.

    ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then the token of
    framecast's own local head (``<home>/ray/auth_token``, for local addresses), then
    ``~/.ray/auth_token`` (written by ``ray start --head`` and ``ray get-auth-token
    --generate``; Ray 2.60 turns token auth on whenever it exists).
    """
    import os

    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    candidates = []
    if env.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser())
    if local_head_token is not None:
        candidates.append(local_head_token)
    candidates.append((home or Path.home()) / ".ray" / "auth_token")
    for path in candidates:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if token:
            return token
    return None


def connect(address: str, token: str | None = None) -> JobsClient:
    """A JobSubmissionClient for the dashboard at address (raises SubmitError if unreachable).

    The bearer token is sent explicitly when one is found, so a client whose own
    ``RAY_AUTH_MODE`` is unset still talks to a head that has token auth on.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    token = token or auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        client = JobSubmissionClient(url, headers=headers)
    except AuthenticationError as error:
        raise SubmitOptionError(
            f"the Ray cluster at {url} wants a token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            f"to the cluster's token ({error.__class__.__name__})"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {error}") from error
    return client


def submit_job(
    client: JobsClient,
    entrypoint: str,
    runtime_env: dict[str, Any],
    *,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
) -> str:
    """Submit; return the job's submission id."""
    kwargs: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtime_env": runtime_env,
        "metadata": metadata or {},
    }
    if submission_id:
        kwargs["submission_id"] = submission_id
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    try:
        return client.submit_job(**kwargs)
    except (RuntimeError, ValueError) as error:
        raise SubmitError(f"job submission failed: {error}") from error


def status_name(status: Any) -> str:
    """A JobStatus (an enum) or a plain string, as its upper-case name."""
    return str(getattr(status, "value", status)).upper()


def tail_logs(client: JobsClient, job_id: str, on_text: Callable[[str], None]) -> None:
    """Stream the job's logs until it ends (the Jobs API's websocket tail)."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            on_text(chunk)

    asyncio.run(_tail())


def wait_terminal(
    client: JobsClient, job_id: str, timeout: float | None = None, poll: float = 0.5
) -> str:
    """Poll until the job reaches a terminal status; return it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = status_name(client.get_job_status(job_id))
        if status in TERMINAL_STATUSES:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {status} after {timeout:.0f}s")
        time.sleep(poll)


def follow_job(
    client: JobsClient,
    job_id: str,
    on_text: Callable[[str], None],
    artifact: str | None = None,
) -> JobOutcome:
    """Tail a job's logs to the end and report how it finished."""
    started = time.monotonic()
    # The websocket may close abnormally (e.g. behind a proxy); polling below still ends it.
    with contextlib.suppress(RuntimeError):
        tail_logs(client, job_id, on_text)
    status = wait_terminal(client, job_id)
    info = client.get_job_info(job_id)
    message = getattr(info, "message", None)
    return JobOutcome(job_id, status, message, artifact, time.monotonic() - started)


def verify_local_artifact(artifact: str) -> list[str]:
    """Files of a local artifact directory that the contract requires but are missing."""
    root = Path(artifact)
    return [name for name in ("manifest.json", "metrics.json") if not (root / name).is_file()]


# -- remembering where jobs went ------------------------------------------------------------------


class JobBook:
    """``<home>/submit/jobs.json``: submission id -> the Jobs API address and what it trains."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "submit" / "jobs.json"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, job_id: str, entry: dict[str, Any]) -> None:
        data = self.load()
        data[job_id] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(self.path)

    def address_of(self, job_id: str) -> str | None:
        entry = self.load().get(job_id)
        return str(entry["address"]) if entry and "address" in entry else None


def resolve_address(
    job_id: str, book: JobBook, candidates: Iterable[str | None]
) -> str:
    """Where job_id lives: the recorded address, else the first usable candidate."""
    recorded = book.address_of(job_id)
    if recorded:
        return recorded
    for candidate in candidates:
        if candidate and (candidate.startswith(("http://", "https://"))):
            return normalize_address(candidate)
    raise SubmitOptionError(
        f"no Jobs API address known for {job_id}: set RAY_ADDRESS=http://HEAD:8265 "
        "(or pass --ray-address http://HEAD:8265 before `submit`)"
    )


# -- what the CLI runs ----------------------------------------------------------------------------


def _addresses_from(settings: Any) -> list[str | None]:
    import os

    from cluster.stack import local_ray_head

    candidates: list[str | None] = [os.environ.get("RAY_ADDRESS"), settings.ray.address]
    info = local_ray_head(settings).info()
    candidates.append(info.dashboard_url if info else None)
    return candidates


def _connect_with(settings: Any, address: str) -> JobsClient:
    """connect(), with the token of framecast's own local head when address is local."""
    from cluster.stack import local_ray_head

    local = local_ray_head(settings).token_file if is_local_address(address) else None
    return connect(address, auth_token(local_head_token=local))


def run_submit_train(
    settings: Any, address: str, args: Sequence[str], train_args: Sequence[str], console: Any
) -> int:
    """`framecast submit train`: submit, follow with progress, print the outcome; exit code.

    args are the submission flags; train_args the training flags, already checked against
    TrainConfig by the CLI (the job runs ``framecast train`` with them).
    """
    options = split_submit_args(address, args, train_args)
    train_args = prepare_train_args(options)
    _quiet_ray_client_logs()
    artifact = _option_value(train_args, "--out")
    local = is_local_address(options.address)
    if local and "FRAMECAST_HOME" not in options.env:
        # Ray Train's checkpoints go under FRAMECAST_HOME; keep them out of the temp copy.
        options.env["FRAMECAST_HOME"] = str(Path(settings.home).resolve())
    runtime_env = build_runtime_env(options)
    entrypoint = train_entrypoint(train_args, job_python(options))
    client = _connect_with(settings, options.address)
    job_id = submit_job(
        client,
        entrypoint,
        runtime_env,
        submission_id=options.submission_id,
        metadata={"framecast": "train", "artifact": artifact or ""},
        entrypoint_num_cpus=options.entrypoint_num_cpus,
    )
    JobBook(settings.home).record(
        job_id,
        {"address": options.address, "entrypoint": entrypoint, "artifact": artifact,
         "submitted_at": time.time()},
    )
    pip = runtime_env.get("pip")
    pip_note = f"{len(pip['packages'])} pinned packages" if pip else "none"
    console.print(f"[bold]submitted[/] {job_id} to {options.address}", highlight=False)
    console.print(f"  entrypoint: {entrypoint}", highlight=False, markup=False)
    console.print(f"  pip: {pip_note}; artifact: {artifact}", highlight=False)
    if not options.follow:
        console.print(f"follow it with: framecast submit logs {job_id}", highlight=False)
        return 0
    outcome = _follow_with_progress(client, job_id, artifact, console)
    colour = "green" if outcome.status == "SUCCEEDED" else "red"
    console.print(
        f"job {job_id}: [{colour}]{outcome.status}[/] after {outcome.seconds:.1f}s"
        + (f" ({outcome.message})" if outcome.message and outcome.status != "SUCCEEDED" else ""),
        highlight=False,
    )
    if outcome.status != "SUCCEEDED":
        return 1
    if local and artifact and "://" not in artifact:
        missing = verify_local_artifact(artifact)
        if missing:
            console.print(f"[red]artifact {artifact} is missing {', '.join(missing)}[/]")
            return 1
    where = "on this machine" if local else "on the cluster"
    console.print(f"artifact ({where}): {artifact}", highlight=False)
    return 0


def _quiet_ray_client_logs() -> None:
    """Ray's packaging chatter (INFO lines per uploaded file) only under --verbose."""
    import logging

    import ray.job_submission  # noqa: F401 - its module loggers set their own levels on import

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in (
            "ray",
            "ray.dashboard.modules.dashboard_sdk",
            "ray._private.runtime_env.packaging",
            "ray._private.runtime_env.working_dir",
        ):
            logging.getLogger(name).setLevel(logging.ERROR)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours worker prefixes in job logs


def _follow_with_progress(
    client: JobsClient, job_id: str, artifact: str | None, console: Any
) -> JobOutcome:
    started = time.monotonic()
    lines = 0

    def on_text(chunk: str) -> None:
        nonlocal lines
        for line in _ANSI.sub("", chunk).splitlines():
            lines += 1
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        status.update(
            f"job {job_id} running · {time.monotonic() - started:.0f}s · {lines} log lines"
        )

    with console.status(f"job {job_id} starting...") as status:
        return follow_job(client, job_id, on_text, artifact)


def run_submit_status(settings: Any, job_id: str, console: Any) -> int:
    """`framecast submit status JOB_ID`."""
    address = resolve_address(job_id, JobBook(settings.home), _addresses_from(settings))
    client = _connect_with(settings, address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        raise SubmitError(f"job {job_id} not found at {address}: {error}") from error
    state = status_name(info.status)
    entry = JobBook(settings.home).load().get(job_id, {})
    console.print(f"{job_id}: {state}", highlight=False)
    if getattr(info, "message", None):
        console.print(f"  message: {info.message}", highlight=False, markup=False)
    console.print(f"  entrypoint: {info.entrypoint}", highlight=False, markup=False)
    if entry.get("artifact"):
        console.print(f"  artifact: {entry['artifact']}", highlight=False)
    return 0 if state != "FAILED" else 1


def run_submit_logs(settings: Any, job_id: str, console: Any, follow: bool = False) -> int:
    """`framecast submit logs JOB_ID`: everything the job printed so far."""
    address = resolve_address(job_id, JobBook(settings.home), _addresses_from(settings))
    client = _connect_with(settings, address)
    try:
        if follow:
            tail_logs(client, job_id, lambda text: console.out(text, end="", highlight=False))
        else:
            console.out(client.get_job_logs(job_id), end="", highlight=False)
    except RuntimeError as error:
        raise SubmitError(f"logs of {job_id} at {address}: {error}") from error
    return 0


def run_submit_stop(settings: Any, job_id: str, console: Any, wait: float = 60.0) -> int:
    """`framecast submit stop JOB_ID`: ask Ray to stop the job and wait until it has."""
    address = resolve_address(job_id, JobBook(settings.home), _addresses_from(settings))
    client = _connect_with(settings, address)
    try:
        requested = client.stop_job(job_id)
    except RuntimeError as error:
        raise SubmitError(f"stop {job_id} at {address}: {error}") from error
    final = wait_terminal(client, job_id, timeout=wait)
    verb = "stopped" if requested else "was already finished"
    console.print(f"{job_id} {verb}: {final}", highlight=False)
    return 0
