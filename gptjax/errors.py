"""The error every module raises for a bad setting: a leaf module, so anything may import it.

`ConfigError` messages name the setting (`config.<section>.<key>`), what is wrong and the fix; the
scripts print them alone and exit with status 2 (`gptjax.cli`), as they do data errors
(`gptjax.data.errors.DataError`).
"""


class ConfigError(ValueError):
  """A setting is invalid; the message names it and says how to fix it."""
