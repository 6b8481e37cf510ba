"""The driver: start or join Ray and run one Ray Train `TorchTrainer` worker per GPU (or CPU worker).

Data and tokenizer are prepared once here, before any worker starts, so that a bad file or row is
reported as a user error with nothing launched. The data goes to the workers as the paths of its
memory-mapped files (its splits pickle as paths), never as the tokens; each worker opens them.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.recipe.load import from_dict, to_dict
from launcher.recipe.sections import Recipe

# Workers write their stdout/stderr here instead of the driver's terminal.
LOG_DIR = "logs"
# What rank 0 is doing before its first step, one line; the driver's progress display shows it.
PHASE_FILE = ".phase"


def write_phase(run_dir: Path, text: str) -> None:
    tmp = run_dir / f"{PHASE_FILE}.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, run_dir / PHASE_FILE)  # the display never reads half a line


@dataclass
class RayPlan:
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: str


def ray_plan(recipe: Recipe) -> RayPlan:
    """How the recipe's resources map onto Ray Train's ScalingConfig (a pure function)."""
    r = recipe.resources
    if r.gpus_per_node:
        return RayPlan(r.nodes * r.gpus_per_node, True, {"GPU": 1, "CPU": r.cpus_per_worker}, "PACK")
    # Without GPUs nothing ties workers to nodes, so spread them when several nodes are asked for.
    strategy = "SPREAD" if r.nodes > 1 else "PACK"
    return RayPlan(r.cpu_workers, False, {"CPU": r.cpus_per_worker}, strategy)


def _worker_entry(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker process."""
    import ray
    import ray.train

    from launcher.runtime.quiet import quiet_libraries

    from launcher.runtime import run_lock

    run_dir = Path(config["run_dir"])
    run_lock.hold_as_worker(run_dir)  # a new driver sees this worker while it lives
    os.environ[run_lock.DRIVER_ENV] = config.get("driver", "")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    log_dir = run_dir / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    _redirect_output(log_dir / f"rank-{rank}.log")
    (log_dir / f"rank-{rank}.node").write_text(node_id + "\n")
    print(f"launcher: rank {rank} of {world} on node {node_id[:12]}, pid {os.getpid()}, run {run_dir}",
          flush=True)
    if rank == 0:
        write_phase(run_dir, "loading PyTorch, DeepSpeed and transformers on the workers")
    quiet_libraries()  # before the imports below: some libraries warn while importing
    from launcher.runtime.train_loop import train

    quiet_libraries(loaded=True)
    recipe = from_dict(config["recipe"])
    data = ray.get(config["data_ref"]) if config.get("data_ref") is not None else None
    tokenizer = ray.get(config["tokenizer_ref"]) if config.get("tokenizer_ref") is not None else None
    if rank == 0:
        write_phase(run_dir, "building the model and the DeepSpeed engine")
    print("launcher: building the model and the DeepSpeed engine", flush=True)
    summary = train(recipe, run_dir, tokenizer=tokenizer, data=data, resume=config.get("resume", True))
    print(f"launcher: {_ending(summary)}", flush=True)


def _ending(summary: dict[str, Any]) -> str:
    """The worker's last log line."""
    if summary.get("preempted"):
        committed = summary.get("committed") or "no checkpoint committed"
        why = summary.get("signal") or "stop request"
        return f"stopped after step {summary.get('step')} ({why}): {committed}"
    return f"done: {summary.get('steps')} steps, final loss {summary.get('final_loss')}"


def _redirect_output(path: Path) -> None:
    """Send this process's stdout/stderr (Python and C++ alike) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _init_ray(address: str | None, plan: RayPlan) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a private local Ray. Returns True if started here."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **common)
        return False
    cpus = max(os.cpu_count() or 1, plan.num_workers * int(plan.resources_per_worker.get("CPU", 1)))
    _quiet_default_token_notice()
    ray.init(
        # "local" always starts a new cluster: without it Ray joins any cluster that `ray start`
        # left running on this machine (another user's, another job's).
        address="local",
        num_cpus=cpus,
        _node_ip_address="127.0.0.1",  # a private local cluster listens on loopback only
        object_store_memory=256 * 1024**2,
        **common,
    )
    return True


class _DropTokenEnabledNotice:
    """Ray announces on every start that it turned token authentication on by default. That is
    what we want for the private cluster, and the line interrupts the terminal's progress display;
    Ray's warning that authentication is *off* still shows."""

    def filter(self, record: Any) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _quiet_default_token_notice() -> None:
    import logging

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenEnabledNotice) for f in log.filters):
        log.addFilter(_DropTokenEnabledNotice())


def _unwrap_user_error(exc: BaseException) -> UserError | None:
    """Find a UserError raised inside a worker among the causes Ray Train wraps it in."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend([getattr(e, "__cause__", None), getattr(e, "__context__", None), getattr(e, "cause", None)])
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
    return None


def run_on_ray(
    recipe: Recipe,
    run_dir: Path,
    *,
    tokenizer: Any,
    data: Any,
    ray_address: str | None = None,
    phase: Callable[[str], None] | None = None,
) -> None:
    """Run the recipe's workers on Ray; returns when training has finished or stopped on every
    worker. A first SIGTERM/SIGINT/SIGUSR1 asks the workers to checkpoint and stop (see
    `launcher.checkpoint.preempt`); a second one abandons the save and returns at once, with
    RUN_DIR/preempted.json saying so. `phase(text)` hears what the job is doing before its
    first step."""
    import socket

    import ray

    from launcher.runtime import reaper

    say = phase or (lambda text: None)
    plan = ray_plan(recipe)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    started, reaping = False, None
    try:
        # From the start of Ray to its shutdown: a Ctrl-C while Ray starts gets the same two-step
        # treatment, and a third one while it shuts down leaves at once.
        with forward_stop_signals(run_dir, recipe) as reinstall:
            try:
                say(f"joining Ray at {address}" if address else "starting Ray")
                started = _init_ray(ray_address, plan)
                if started:  # the private cluster ends with this process, however it ends
                    reaping = reaper.start()
                # Ray's core replaced our SIGTERM handler with its own (a stack dump and abort)
                reinstall()
                # Ray Train would send the workers' print() to its logger (on stderr) as well as
                # to stdout: every line twice in the rank logs. Ray Train passes this on to them.
                os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
                trainer = _trainer(recipe, run_dir, plan, {
                    "recipe": to_dict(recipe),
                    "run_dir": str(run_dir.resolve()),
                    "data_ref": ray.put(data),
                    "tokenizer_ref": ray.put(tokenizer),
                    # Always the run's own commits: `--no-resume` already moved an earlier run
                    # aside (run_job), so the first start finds none, and a worker group that
                    # Ray Train restarts after a crash resumes instead of starting over at step 0
                    # and wiping the metrics.
                    "resume": True,
                    "driver": f"{socket.gethostname()}:{os.getpid()}",
                })
                say(f"starting {plan.num_workers} worker{'s' if plan.num_workers != 1 else ''}")
                _fit_guarded(trainer, run_dir)
            finally:
                if started or (not address and ray.is_initialized()):  # also a start cut short
                    ray.shutdown()  # ends the workers, mid-step after a StopNow
                reaper.release(reaping)  # and what ray.shutdown left (its agents)
    except StopNow:
        return  # preempted.json says so


def _fit_guarded(trainer: Any, run_dir: Path) -> None:
    try:
        _fit_off_the_main_thread(trainer)
    except Exception as e:  # Ray wraps worker exceptions; surface the user's own mistakes
        user = _unwrap_user_error(e)
        if user is not None:
            raise user from None
        raise WorkerFailed(run_dir, e) from e


def _trainer(recipe: Recipe, run_dir: Path, plan: RayPlan, config: dict[str, Any]) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        _worker_entry,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources_per_worker,
            placement_strategy=plan.placement_strategy,
        ),
        run_config=RunConfig(
            name=recipe.name,
            storage_path=str((run_dir / "ray").resolve()),
            # a restarted worker group resumes from the latest committed checkpoint
            failure_config=FailureConfig(max_failures=recipe.checkpoint.max_worker_restarts),
        ),
    )


def _fit_off_the_main_thread(trainer: Any) -> None:
    """Ray Train's fit(), called on the main thread, replaces the SIGINT handler with its own,
    which aborts the run without a checkpoint (Ctrl-C exited 1). Called on another thread, it
    leaves ours in place (as under Ray Tune). The main thread waits in short joins, so that our
    handlers run at once."""
    box: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread, which raises it
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]


class StopNow(BaseException):
    """Raised on the main thread by a second stop signal: leave without waiting for the workers.
    A BaseException, so that no `except Exception` on the way swallows it."""


@contextmanager
def forward_stop_signals(run_dir: Path, recipe: Recipe) -> Iterator[Callable[[], None]]:
    """While the workers train: the first signal writes the stop request they poll after every
    step; the second marks it aborted (a save in progress is never committed), records the stop
    in preempted.json and raises StopNow; a third exits the process at once. Yields a function
    that installs the handlers again (after a library replaced them)."""
    import signal

    from launcher.checkpoint import preempt
    from launcher.errors import EXIT_PREEMPTED

    window = preempt.notice_window_s(recipe.checkpoint.preempt_window_s)
    count = 0

    def handle(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            preempt.request_stop(run_dir, signum, window)
            print(f"launcher: {name}: checkpointing and stopping after this step "
                  f"(press Ctrl-C again or send it again to stop at once)", file=sys.stderr, flush=True)
            return
        if count == 2:
            preempt.request_stop(run_dir, signum, window, abort=True)
            preempt.record_abort(run_dir, name)
            print(f"launcher: second {name}: stopping at once, without committing a checkpoint",
                  file=sys.stderr, flush=True)
            raise StopNow()
        os._exit(EXIT_PREEMPTED)  # Ray's shutdown itself hangs: leave now

    old: dict[int, Any] = {}

    def install() -> None:
        for s in preempt.SIGNALS:
            old.setdefault(s, signal.signal(s, handle))

    install()
    try:
        yield install
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class WorkerFailed(RuntimeError):
    """A training worker crashed; the message points at its log."""

    def __init__(self, run_dir: Path, cause: BaseException):
        self.run_dir = run_dir
        super().__init__(f"training failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
