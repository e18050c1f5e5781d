"""One error convention for every entry point.

A problem with the user's input (a file, a flag, a config key) raises `UserError` with a message that
names the file / key / value and says how to fix it. Entry points run their `main` through `run_main`,
which prints such errors as `prog: error: <message>` on stderr and exits with status 2 (argparse's own
convention), with no traceback. Anything else is a bug and keeps its traceback. `--debug` on the
command line, or COCORD_DEBUG=1 in the environment, shows the traceback of user errors too.
"""
import contextlib
import os
import sys


class UserError(ValueError):
    """Bad input that the user can fix; the message says what, where and how."""


# OS errors about a path the user gave are user errors as well (missing file, a folder where a file
# was expected, no permission).
USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

@contextlib.contextmanager
def input_checks():
    """Around a call into code that reports bad input with a plain ValueError (the argument checks of
    a library layer): such an error becomes a UserError with the same message, the original chained
    (--debug shows both)."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e


DEBUG_FLAG = "--debug"
DEBUG_ENV = "COCORD_DEBUG"


def debug_requested(argv):
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(main, argv=None, prog=None):
    """Call main(argv) and turn user errors into `prog: error: …` and exit status 2.

    `--debug` is taken out of argv before main sees it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
