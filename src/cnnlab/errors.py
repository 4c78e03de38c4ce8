"""The one exception type that reaches the user as a single line instead of a traceback."""


class CnnlabError(Exception):
    """A problem with the user's input or environment: a bad path, file, argument or setting.

    The message names the thing at fault and says what was expected; the CLI prints it alone.
    """


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (or its type's name): enough to quote in one of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
