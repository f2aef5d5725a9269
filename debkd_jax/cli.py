"""What every command line shares: one `error: ...` line and exit status 2 for anything the user can fix.

A bad flag, an unknown or mistyped config field, an out-of-range value, bad data, a busy or unwritable
workdir, a diverged run: each ends with one `error: ...` line on stderr and exit status 2, without a Python
traceback. Ctrl-C exits with status 130 after the last checkpoint is committed. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys

from absl import flags

from debkd_jax import config_lib, supervisor
from debkd_jax.errors import UserError
from debkd_jax.supervisor import EXIT_INTERRUPTED, EXIT_USER_ERROR

FLAGS = flags.FLAGS


def _say_error(message: str, status: int) -> None:
    """Prints `error: message`; a supervised job also sends it to its parent, which ends with it."""
    supervisor.tell_parent("error", message=message, status=status)
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: str, status: int = EXIT_USER_ERROR):
    """Prints `error: message` and exits. Libraries' log records emitted while the interpreter shuts down
    (asyncio's 'Future exception was never retrieved' for a failed checkpoint write) would only repeat it."""
    _say_error(message, status)
    logging.disable(logging.CRITICAL)
    sys.exit(status)


def fail_now(message: str, status: int = EXIT_USER_ERROR):
    """Prints `error: message` and exits at once, skipping the exit handlers: once another process of the job
    has died, `jax.distributed`'s exit handler would wait for it and then abort with a stack trace."""
    _say_error(message, status)
    sys.stdout.flush()
    os._exit(status)


def _config_spec(argv) -> str | None:
    """The value of --config (`path[:arg]`) in argv, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config(spec: str):
    """The config named by `path[:arg]`; None if it cannot be loaded."""
    try:
        return config_lib.load_config(spec)
    except Exception:  # noqa: BLE001 - only used to word a message; the real load reports its own error.
        return None


def _describe_override_error(argv, error: Exception) -> str:
    """Words an error raised while applying `--config.a.b=v` overrides: which field is unknown and which
    fields exist at that level."""
    spec = _config_spec(argv)
    config = _load_config(spec) if spec else None
    overrides = [a for a in argv if a.startswith(("--config.", "-config.", "--noconfig.", "-noconfig."))]
    if config is not None:
        for arg in overrides:
            path = arg.split("=", 1)[0].split("config.", 1)[1]
            node, walked = config, "config"
            for part in path.split("."):
                keys = list(node.keys()) if hasattr(node, "keys") else None
                if keys is None:
                    return f"{arg}: {walked} is the {type(node).__name__} {node!r}, it has no field {part!r}."
                if part not in keys:
                    where = "fields" if walked != "config.methods" else "methods (names of method configs)"
                    return (
                        f"{arg}: {walked} has no field {part!r}. Its {where}: {', '.join(sorted(keys))}. "
                        "Fields are fixed by the config file: see its docstring and debkd_jax/config_lib.py."
                    )
                node, walked = node[part], f"{walked}.{part}"
    detail = str(error).strip().strip("\"'") or type(error).__name__
    return f"cannot apply the --config overrides {' '.join(overrides)} ({type(error).__name__}: {detail})."


def _expected_type(argv, message: str) -> str:
    """' (config.X takes a float, like its default 0.05).' for a message about --config.X=..., else ''."""
    match = re.search(r"--config\.([\w.+-]+)=", message)
    spec = _config_spec(argv)
    config = _load_config(spec) if (match and spec) else None
    if config is None:
        return ""
    node = config
    for part in match.group(1).split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return ""
        node = node[part]
    kind = type(node).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f" (config.{match.group(1)} takes {article} {kind}, like its default {node!r})."


def parse_flags(argv):
    """absl's flag parsing, with every error as one clear line and exit status 2 instead of a traceback."""
    try:
        args = FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        message = str(e)
        if "Error whilst parsing config file" in message:  # get_config() raised: keep its last line
            last = [line for line in message.splitlines() if line.strip()][-1]
            fail(f"--config={_config_spec(argv)}: the config file's get_config() failed: {last}")
        fail(f"{message}{_expected_type(argv, message)}")
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a field the config lacks
        fail(_describe_override_error(argv, e))
    except OSError as e:  # a config file that cannot be read (ml_collections raises it on first use)
        _config_file_error(argv, e)
    except (TypeError, ValueError) as e:  # a bad override value
        fail(f"{type(e).__name__}: {e}")
    try:  # ml_collections defers a missing config file's error to the first use of the config
        FLAGS.config.get("seed")
    except OSError as e:
        _config_file_error(argv, e)
    return args


def _config_file_error(argv, error: OSError):
    spec = _config_spec(argv) or ""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        fail(f"--config={spec}: no config file {os.path.abspath(path)}; see configs/ for the configs.")
    fail(f"--config={spec}: {' '.join(str(error).split())}")


class _OneLineLibraryErrors(logging.Filter):
    """Orbax logs the failure of a background checkpoint write with its traceback, and the main thread then
    raises the same error, which we report as one `error:` line: keep its log records to one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def start(argv) -> None:
    """What every absl command line does first: refuse positional arguments, quiet the libraries' logs."""
    if len(argv) > 1:
        fail(
            f"unexpected arguments: {' '.join(argv[1:])} (flags: --config=..., --workdir=..., --config.X=V)."
        )
    quiet_libraries()


def supervise(config) -> None:
    """With `config.distributed`, the process the user started runs the job as a supervised child (the same
    command line; `debkd_jax.supervisor`) and exits as the child's outcome says: every fault of the job,
    even one where JAX aborts the child, ends with one `error:` line and status 2. Returns at once in the
    child and without `distributed`."""
    if supervisor.is_supervised():
        supervisor.start_child()
    elif config.get("distributed", False):
        sys.exit(supervisor.run_supervised())


def quiet_libraries() -> None:
    """absl at WARNING, and orbax's logged tracebacks of failed background writes as one line each."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_OneLineLibraryErrors())


@contextlib.contextmanager
def user_errors(workdir: str | None = None):
    """Turns the errors a user can fix, raised inside the block, into one `error:` line and exit status 2
    (130 for Ctrl-C); nothing else is caught."""
    try:
        yield
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        where = f"Checkpoints up to the last finished epoch are in {workdir}: r" if workdir else "R"
        fail(f"interrupted. {where}e-run the same command to resume.", EXIT_INTERRUPTED)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            fail(f"cannot write {e.filename or workdir}: {e.strerror}. Finished files are kept.")
        raise
    except Exception as e:
        lost = lost_process_error(e)
        if lost is None:
            raise
        fail_now(str(lost))


_LOST_PROCESS_SIGNS = (
    "Connection closed by peer",  # Gloo (CPU collectives): the other side of a TCP pair exited
    "Connection reset by peer",
    "Gloo",
    "heartbeat timeout",  # the coordination service declared a silent process dead
    "CoordinationServiceError",
    "Barrier failed",
)


def lost_process_error(error: BaseException) -> UserError | None:
    """The `UserError` to report when `error` means that another process of a multi-process job died or became
    unreachable (a collective or a barrier with it failed); None for any other error."""
    import jax  # here, not at the top: a distributed job's launching process imports this module without JAX

    if isinstance(error, UserError) or not jax.distributed.is_initialized() or jax.process_count() == 1:
        return None
    text = str(error)
    if not any(sign in text for sign in _LOST_PROCESS_SIGNS):
        return None
    first = " ".join(text.strip().splitlines()[0].split())[:300] if text.strip() else type(error).__name__
    return UserError(
        f"process {jax.process_index()} of {jax.process_count()}: another process of this job stopped or "
        f"cannot be reached ({first}), so this one stops too. Committed checkpoints are kept: re-launch "
        "every process with the same command to resume."
    )
