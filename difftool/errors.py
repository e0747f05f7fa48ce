"""The one exception type whose message is shown to the user as is, without a traceback."""


class DifftoolError(Exception):
    """A problem the user can fix: the message names it and says how."""

    exit_code = 1


class Interrupted(DifftoolError):
    """The user stopped a run (Ctrl-C); the message says what was kept."""

    exit_code = 130


def hub_unreachable(what: str, exc: Exception) -> DifftoolError:
    """The error for something that had to come from the Hugging Face Hub and could not."""
    return DifftoolError(
        f"could not load {what} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
        "If the hub is unreachable from this machine, use local files instead: dataset "
        "name = \"imagefolder\" with path = \"a/folder/of/images\", or `difftool run "
        "recipes/quickstart.toml`, which needs no network"
    )
