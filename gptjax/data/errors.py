"""The one error type of the data package."""


class DataError(ValueError):
  """A data setting or input is unusable; the message names the setting and how to fix it."""


def fail(setting: str, problem: str, fix: str) -> DataError:
  """Builds a `DataError` reading 'config.<setting>: <problem>. <fix>'.

  Args:
    setting: the config key to blame, relative to the root config, e.g. 'data.paths'.
    problem: what is wrong, without a trailing period.
    fix: one sentence saying how to fix it.

  Returns:
    The error, for the caller to raise (so tracebacks point at the caller).
  """
  return DataError(f"config.{setting}: {problem}. {fix}")
