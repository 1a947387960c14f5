"""The one exception type for problems a user can fix (bad config, data, checkpoint path, a
full disk), and the test for a full disk in any library's error.

Entry points print these as a single line; everything else keeps its traceback.
"""
import errno

# How a full disk reads in errors that are not OSError: tensorstore (orbax) raises ValueError
# 'RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']'.
DISK_FULL_TEXT = ("No space left on device", f"os_error_code='{errno.ENOSPC}'")


class UserError(ValueError):
  """A problem with user input: the message names the offending value."""


class ConfigMismatch(UserError):
  """A checkpoint that does not fit the config it is restored with (the config changed)."""


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` or an exception in its cause / context chain is a full disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if any(text in str(error) for text in DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False
