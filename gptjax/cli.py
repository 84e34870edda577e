"""The one way scripts/ start: `absl.app.run`, with a project error ending in its message alone.

A configuration or data error (`ConfigError`, `DataError`, `EvalError`, `SweepError`,
`DistributedError`, the loop's `NonFiniteError`) already names the setting and the fix, so a
traceback would only hide it: the program prints `error: <message>` on stderr and exits with status
2. Anything else keeps its traceback and Python's status; absl's own usage and flag errors are
reported by absl as before.
"""

import sys
from typing import Callable, NoReturn

from absl import app

EXIT_STATUS = 2  # a project error: the input was wrong, not the program

# (module, class) of every error whose message names the setting and how to fix it. The modules are
# not imported here: an error can only have been raised by a module that is already loaded.
PROJECT_ERRORS = (
    ("gptjax.errors", "ConfigError"),
    ("gptjax.data.errors", "DataError"),
    ("gptjax.distributed", "DistributedError"),
    ("gptjax.eval_tasks", "EvalError"),
    ("gptjax.loop", "NonFiniteError"),
    ("gptjax.sweep", "SweepError"),
)


def project_errors() -> tuple[type[BaseException], ...]:
  """The classes of `PROJECT_ERRORS` whose modules are loaded (the only ones that can be raised)."""
  return tuple(getattr(sys.modules[module], name) for module, name in PROJECT_ERRORS
               if module in sys.modules)


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """`main`, with a project error turned into its message on stderr and exit status 2."""

  def wrapped(argv: list[str]) -> object:
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless a project error)
      if not isinstance(e, project_errors()):
        raise
      fail(str(e))

  return wrapped


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` on stderr and exits with `EXIT_STATUS`."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_STATUS)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> NoReturn:
  """`absl.app.run(main)`, ending a project error with its message (see the module docstring)."""
  app.run(guarded(main), argv=argv)
