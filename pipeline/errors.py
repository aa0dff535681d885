"""The one exception type for mistakes a user can fix (bad config, bad path, bad layout)."""


class UserError(Exception):
    """A problem the user can fix. The CLI prints its message as one line, without a traceback.

    The message should name the fix, e.g. "input file not found: urls.parquet (pass a parquet/csv/jsonl path)".
    """
