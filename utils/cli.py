"""Command-line helpers shared by the four scripts: flag types, logging and the error exit."""

import argparse
import atexit
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from utils.errors import UserError

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in the help, except empty ones, and keep the description's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message}; see '{self.prog} --help'\n")


def positive_int(text: str) -> int:
    """Parse a whole number greater than zero, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number greater than 0 (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number greater than 0 (got {text!r})")
    return value


def non_negative_int(text: str) -> int:
    """Parse a whole number of at least zero, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more (got {text!r})")
    return value


def _checked_float(text: str, accept, expected: str, hint: str | None = None) -> float:
    """Parse a float for argparse, raising "expected <expected> (got ...)" unless ``accept(value)``.

    ``hint`` replaces ``expected`` in the message for a number that parses but is out of range.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected} (got {text!r})") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {hint or expected} (got {text!r})")
    return value


def positive_float(text: str) -> float:
    """Parse a finite number greater than zero, for argparse."""
    return _checked_float(text, lambda value: 0 < value < math.inf, "a number greater than 0",
                          "a finite number greater than 0")


def unit_interval(text: str) -> float:
    """Parse a number in [0, 1], for argparse (thresholds)."""
    return _checked_float(text, lambda value: 0.0 <= value <= 1.0, "a number from 0 to 1")


def accept_rate(text: str) -> float:
    """Parse a share of known photos to accept, in (0, 1], for argparse."""
    return _checked_float(text, lambda value: 0.0 < value <= 1.0, "a number above 0 and at most 1",
                          "a number above 0 and at most 1, for example 0.95")


def finite_float(text: str) -> float:
    """Parse any finite number, for argparse."""
    return _checked_float(text, math.isfinite, "a number", "a finite number")


def open_fraction(text: str) -> float:
    """Parse a number in [0, 1), for argparse (dropout rates, split fractions)."""
    return _checked_float(text, lambda value: 0.0 <= value < 1.0, "a number from 0 up to but not including 1")


def granja_name(text: str) -> str:
    """Parse a granja name, which must be a plain folder name."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("a granja name must not be empty (use a folder name such as 'dogs42')")
    if text in (".", "..") or "/" in text or "\\" in text or os.path.isabs(text) or "\x00" in text:
        raise argparse.ArgumentTypeError(
            f"a granja name must be a plain folder name without path separators or '..' (got {text!r}); "
            "give only the folder's name, such as 'dogs42'"
        )
    return text


def add_root_flags(parser: argparse.ArgumentParser, *, dataset: bool = True, logs: bool = True) -> None:
    """Add --dataset-dir, --models-dir and --logs-dir, the three per-granja roots."""
    group = parser.add_argument_group("folders")
    if dataset:
        group.add_argument("--dataset-dir", type=Path, default=Path("dataset"), metavar="DIR",
                           help="folder holding one sub-folder per granja, each with one sub-folder per class")
    group.add_argument("--models-dir", type=Path, default=Path("models"), metavar="DIR",
                       help="folder holding models/<granja>/ with the trained model and its files")
    if logs:
        group.add_argument("--logs-dir", type=Path, default=Path("logs"), metavar="DIR",
                           help="folder holding logs/<granja>/ with TensorBoard runs and reports")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Add --debug, which shows tracebacks for user errors and turns on debug logging."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")


class DeferredInfoHandler(logging.StreamHandler):
    """A stderr handler that holds back progress records for the first seconds of a run.

    Most user errors (a missing folder, a class too small, a file that disagrees) are found within
    seconds. Holding back INFO records until then lets ``run`` drop them, so the error is the only
    line on stderr besides warnings, which are written at once. The end of the window (a timer) or
    a normal exit writes the held records.
    """

    def __init__(self, stream, window: float):
        super().__init__(stream)
        self._held_records: list[logging.LogRecord] | None = []
        self._timer = threading.Timer(window, self.write_held)
        self._timer.daemon = True
        self._timer.start()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock:
            if self._held_records is not None and record.levelno < logging.WARNING:
                self._held_records.append(record)
                return
        super().emit(record)

    def write_held(self) -> None:
        """Write the held records and stop holding new ones."""
        with self.lock:
            records, self._held_records = self._held_records, None
            for record in records or []:
                super().emit(record)
        self._timer.cancel()

    def close(self) -> None:
        """Write the held records and stop the timer (``logging.basicConfig(force=True)`` closes handlers)."""
        self.write_held()
        super().close()

    def drop_held(self) -> None:
        """Drop the held records (a user error is about to be reported) and stop holding."""
        with self.lock:
            self._held_records = None
        self._timer.cancel()


# Seconds during which progress records are held back; see DeferredInfoHandler.
INFO_HOLD_SECONDS = 3.0
_release_registered: list[bool] = []


def setup_logging(debug: bool = False) -> None:
    """Send log records to stderr, so that stdout carries only a script's result."""
    handler = logging.StreamHandler(sys.stderr) if debug else DeferredInfoHandler(sys.stderr, INFO_HOLD_SECONDS)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
    if not _release_registered:
        atexit.register(_release_held_records)
        _release_registered.append(True)
    # TensorFlow's loggers are noisy at info level and report nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("h5py").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def quiet_tensorflow() -> None:
    """Import TensorFlow with its start-up banner silenced; call before anything imports it.

    TensorFlow's C++ side prints CUDA probes and oneDNN notices to stderr, some of them before
    its own log level applies, and none that a user can act on. ``TF_CPP_MIN_LOG_LEVEL`` is only
    set when the user has not set it, and ``TF_CPP_MIN_LOG_LEVEL=0`` or ``1`` brings the messages back.
    """
    if "tensorflow" in sys.modules:
        return
    verbose = os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if verbose:
        import tensorflow  # noqa: F401
        return

    # The absl messages written before logging is initialised ignore TF_CPP_MIN_LOG_LEVEL, so
    # stderr itself is pointed at /dev/null for the duration of the import.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _deferred_handlers() -> list[DeferredInfoHandler]:
    return [handler for handler in logging.getLogger().handlers if isinstance(handler, DeferredInfoHandler)]


def _release_held_records() -> None:
    for handler in _deferred_handlers():
        handler.write_held()


def _discard_held_records() -> None:
    for handler in _deferred_handlers():
        handler.drop_held()


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main`` and turn user errors and Ctrl-C into exit codes.

    A ``UserError`` prints ``error: <message>`` on one line and returns 2; with ``--debug`` in
    ``argv`` the traceback is printed as well. Ctrl-C returns 130. Any other exception is a bug
    and propagates with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
    except UserError as err:
        if debug:
            logger.exception("user error")
        else:
            _discard_held_records()
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _release_held_records()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (for example `| head`); point stdout at /dev/null so
        # Python's exit-time flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    _release_held_records()
    return 0 if code is None else int(code)
