"""The one exception type for problems a user can fix (bad config, data, checkpoint path).

Entry points print these as a single line; everything else keeps its traceback.
"""


class UserError(ValueError):
  """A problem with user input: the message names the offending value."""
