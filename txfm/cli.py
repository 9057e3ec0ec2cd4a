"""The ``txfm`` command: ``txfm data synth|convert``, ``txfm train``, ``txfm embed``,
``txfm genes``, ``txfm eval relationships|perturbation``.

Each subpackage registers its own subcommands (``register(subparsers)`` in its ``cli``
module) and imports its heavy dependencies (torch, anndata, zarr, scikit-learn) only when its
command runs: reading the options and ``--help`` take a fraction of a second.

A user's mistake (bad option value, missing or unreadable input, an output that would
overwrite something the command did not make: a run folder, a shard collection, an
embedding under the same key) ends in one ``error: ...`` line on stderr and exit status 2,
never a traceback: commands raise :class:`UsageError`, and :func:`main` also reports the library's own
bad-input errors (:data:`USER_ERRORS`) that way. A reader of the output that stops early
(``txfm ... | head``) ends the command quietly with status 141 (:func:`run_piped`, which every
``python -m`` entry point of txfm, txfm_kernels and bench goes through).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import math
import os
import re
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """A mistake of the user's; the message names the argument or file and says what to do.

    ``txfm`` prints it as one ``error: <message>`` line on stderr and exits with status 2.
    """


# Library errors that always mean "this input is bad" (module, class name); looked up in
# sys.modules so that reporting an error never imports a heavy module.
USER_ERRORS = (("txfm.data.readers", "InputError"), ("txfm.data.layout", "ShardReadError"),
               ("txfm.train.checkpoint", "CheckpointError"), ("txfm.locks", "FolderBusyError"),
               ("txfm.train.trainer", "TrainingDiverged"))


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UsageError):
        return True
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def error_message(exc: BaseException) -> str:
    """The text of an exception without ``KeyError``'s quotes."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc)


def report(line: str) -> None:
    """Print ``line`` on stderr; under ``torchrun``, once per machine and launch.

    Every rank checks the same options and files, so a bad input would otherwise give one
    identical ``error:`` (or ``warning:``) line per rank. torchrun gives the ranks of one
    launch attempt on a machine a shared folder of their own (the parent of each rank's
    ``TORCHELASTIC_ERROR_FILE`` folder); the first rank to create the line's marker there
    prints it. A line that only one rank meets (its own shard) still prints; ranks started
    another way print every line.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        folder = os.path.join(os.path.dirname(os.path.dirname(error_file)), "txfm-lines")
        key = hashlib.sha1(line.encode()).hexdigest()[:20]
        try:
            os.makedirs(folder, exist_ok=True)
            os.close(os.open(os.path.join(folder, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another rank of this launch printed it
        except OSError:
            pass  # no usable folder: print on every rank rather than never
    print(line, file=sys.stderr)


#: Exit status after the reader of the output went away (``txfm ... | head``): 128 + SIGPIPE,
#: what a shell reports for a Unix tool that a closed pipe stopped.
CLOSED_PIPE_STATUS = 141


def _readers_gone() -> list[int]:
    """The file descriptors of stdout and stderr that are pipes whose reader has exited.

    A pipe with no reader polls as an error on its write end; asking the descriptors (not
    the :class:`BrokenPipeError`, which names no file) keeps a broken pipe to a subprocess or
    a socket a fault of its own instead of a quiet exit."""
    import select

    if not hasattr(select, "poll"):  # Windows: no poll; a broken pipe there is stdout's
        return [1]
    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return [fd for fd, events in poller.poll(0) if events & (select.POLLERR | select.POLLHUP)]


def run_piped(main: Callable[[], int | None]) -> int:
    """Run ``main()`` (an entry point's body) and return its exit status (``None`` counts as 0).

    Python ignores SIGPIPE and raises :class:`BrokenPipeError` instead
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe), so ``txfm ... | head``
    would end in a traceback once ``head`` exits, or in an "Exception ignored" message when
    the interpreter flushes stdout at exit. Here stdout is flushed before returning, and once
    the reader of stdout (or of stderr) is gone, those descriptors point at ``os.devnull``
    and the command stops quietly with :data:`CLOSED_PIPE_STATUS`, as a Unix tool does. A
    ``SystemExit`` (``--help``, an argument error) passes through after the flush. Any other
    broken pipe is re-raised.
    """
    try:
        try:
            code = main()
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, where it cannot be caught
    except BrokenPipeError:
        gone = _readers_gone()
        if not gone:
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in gone:
            os.dup2(devnull, fd)
        os.close(devnull)
        return CLOSED_PIPE_STATUS
    return int(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose refusals (an unknown option, a bad value) are one ``error:``
    line naming the option and exit status 2, like every other mistake: argparse's own print
    the whole usage first, which buries the line that matters. ``--help`` still shows it.

    A value that starts with a minus and a digit (``--lr -1e-3``, ``--cases -4:sc``) is a value,
    so its own check can name what is wrong with it: argparse takes only plain numbers such as
    ``-5`` for values and reports the others as a missing argument. No option name here starts
    with a digit, so nothing is lost."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        report(f"error: {message} (see {self.prog} --help)")
        self.exit(2)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported with the help of the (sub)command
        it was given to (``see txfm train --help``), not only the top level's."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(ns).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _chosen(self, ns) -> "argparse.ArgumentParser":
        """The deepest subcommand's parser that ``ns`` selected (self without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(ns, action.dest, None) or "")
                if isinstance(sub, ArgumentParser):
                    return sub._chosen(ns)
        return self


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: ...)`` after each option's help, except where it says nothing:
    a required option, a default of None, or a help that already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def file_in_path(path) -> "pathlib.Path | None":
    """The existing *file* among ``path``'s parent folders, which stops ``path`` from ever being
    made (``out/sub`` where ``out`` is a file), or None. ``path`` itself is not looked at."""
    import pathlib

    return next((a for a in pathlib.Path(path).parents if a.exists() and not a.is_dir()), None)


def folder_problem(path) -> str | None:
    """Why a folder cannot be made (or written) at ``path``, or None when it can. Leaves
    nothing behind.

    Permission bits do not answer it (root passes ``os.access`` on ``/proc``, which takes no new
    folders), so a scratch folder is made in the nearest existing ancestor and removed again.
    """
    import os
    import pathlib
    import tempfile

    path = base = pathlib.Path(path)
    try:
        blocking = path if path.exists() and not path.is_dir() else file_in_path(path)
    except OSError as exc:  # a name too long for the file system, say
        return f"cannot be used ({exc.strerror or exc}); give another name"
    if blocking is not None:
        what = "is" if blocking == path else f"lies under {blocking}, which is"
        return f"{what} a file, not a folder; give another folder"
    try:
        while not base.exists() and base.parent != base:
            base = base.parent
        os.rmdir(tempfile.mkdtemp(prefix=".txfm-write-test-", dir=base))
    except OSError as exc:
        where = "" if base == path else f" (in {base})"
        # /proc and the like exist but take no new entries, which the OS words as "no such file"
        why = ("it takes no new files or folders" if exc.errno == errno.ENOENT and base.is_dir()
               else exc.strerror)
        return f"cannot write there{where}: {why}; give a folder you can write to"
    return None


# -- argparse types for numeric options: the option is named by argparse in its error --------
def int_at_least(low: int):
    """argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(low: float | None = None, *, above: bool = False):
    """argparse ``type``: a finite float, ``>= low`` (``> low`` with ``above=True``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}, got {value}")
        return value

    parse.__name__ = "finite number"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def check_device(option: str, device: str) -> str:
    """``device`` (``auto``, ``cpu`` or ``cpu:0``, ``cuda`` or ``cuda:N``) if usable here (``cpu``
    for either CPU name), else UsageError."""
    from txfm.devices import DEVICE_NAMES, device_problem, parse_device

    if device == "auto":
        return device
    parsed = parse_device(device)
    if parsed is None:
        raise UsageError(f"{option} {device!r}: use {DEVICE_NAMES}")
    problem = device_problem(parsed)
    if problem:
        raise UsageError(f"{option} {device!r}: {problem}; use {option} cpu or auto")
    return str(parsed)


DESCRIPTION = """\
TxFM (arXiv:2605.31562): make and convert training data, train the model, embed cells and
evaluate the embeddings. `txfm COMMAND --help` describes each command.

A mistake in the options or the inputs ends in one `error:` line and exit status 2; Ctrl-C
exits with 130 and SIGTERM with 143, leaving no half-written output."""


def help_text(doc: str) -> str:
    """A docstring as ``--help`` text: reStructuredText markup (double backquotes, ``:role:``
    references, a literal block's ``::``) as plain text."""
    import re

    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", doc)
    return doc.replace("``", "`").replace("::\n", ":\n")


def build_parser() -> argparse.ArgumentParser:
    from txfm.data.cli import register as register_data
    from txfm.eval.cli import register as register_eval
    from txfm.train.cli import register as register_train

    parser = ArgumentParser(prog="txfm", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_data(sub)
    register_train(sub)
    register_eval(sub)
    return parser


def _warning_lines():
    """A ``warnings.showwarning`` that prints each distinct warning once, as one ``warning:``
    line (Python's own format adds the file, line and source of whoever raised it)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in seen:
            seen.add(text)
            report(f"warning: {text}")

    return show


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``timeout``, ``kill``) raised as an interrupt, so that
    the commands' cleanup (temporary files, partial outputs) runs as it does on Ctrl-C."""


# Signals received while a command runs. Some libraries catch the interrupt a signal raises
# inside their own code and raise an error of theirs instead (pandas' C parser reports
# "Calling read(nbytes) on source failed"): a command that fails after a signal was
# interrupted, whatever the error says.
_signalled: list[int] = []


def interrupted() -> bool:
    """True once Ctrl-C or SIGTERM reached the running ``txfm`` command: a caller that catches
    a library's error re-raises :class:`KeyboardInterrupt` instead of blaming its input."""
    return bool(_signalled)


def _terminate(signum, frame):
    _signalled.append(signum)
    raise Terminated()


def _interrupt(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt()


@contextlib.contextmanager
def signals_raise():
    """While the block runs (in the main thread), SIGTERM raises :class:`Terminated` and Ctrl-C
    :class:`KeyboardInterrupt`, so that cleanup runs as on any exception; the handlers found
    are restored after. Nested uses keep the outer one's handlers."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    # Python's own Ctrl-C handler only, never one the caller installed
    own_int = main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_int:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if own_int:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _signalled.clear()  # a later command, or the Python API, starts with a clean slate


def main(argv: list[str] | None = None) -> int:
    """Run ``txfm ARGV``; returns the exit status (2: a user mistake, reported on stderr;
    130 after Ctrl-C, 143 after SIGTERM, with temporary files removed; 141, quietly, once the
    reader of the output has gone away, as in ``txfm ... | head``: :func:`run_piped`)."""
    return run_piped(lambda: _command(argv))


def exit_status(exc: BaseException, stopped_note: str = "") -> int | None:
    """The exit status of a command that stopped on ``exc``, after printing its one line on
    stderr: 143 (``terminated``) after SIGTERM and 130 (``interrupted``) after Ctrl-C, also
    when a library turned the interrupt into an error of its own (either word followed by
    ``: stopped_note`` when one is given); 2 (``error: ...``) for a user's mistake
    (:func:`_is_user_error`); None for anything else, which the caller re-raises. Call it
    inside :func:`signals_raise`, which records the signals."""
    import signal

    if isinstance(exc, KeyboardInterrupt):
        terminated = isinstance(exc, Terminated)
    elif _signalled:
        terminated = signal.SIGTERM in _signalled
    elif _is_user_error(exc):
        report(f"error: {error_message(exc)}")
        return 2
    else:
        return None
    word = "terminated" if terminated else "interrupted"
    report(f"{word}: {stopped_note}" if stopped_note else word)
    return 143 if terminated else 130


def run_stoppable(body: Callable[[], int]) -> int:
    """``body()`` inside :func:`signals_raise`: Ctrl-C, SIGTERM and a user's mistake end it
    with their one line and exit status (:func:`exit_status`); anything else propagates."""
    with signals_raise():
        try:
            return body()
        except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - the rest is re-raised
            status = exit_status(exc)
            if status is None:
                raise
            return status


def _command(argv: list[str] | None) -> int:
    import warnings

    def body() -> int:
        # inside run_stoppable: Ctrl-C while the options are read (or a command's modules
        # load) is an interruption like any other, not a traceback
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_lines()
            return int(args.func(args) or 0)

    return run_stoppable(body)


if __name__ == "__main__":
    # run as ``python -m txfm.cli``: this file is then ``__main__``, a second copy whose
    # UsageError the commands (which import ``txfm.cli``) do not raise; use the module's main
    from txfm.cli import main as _main

    sys.exit(_main())
