"""The error of a command's inputs."""


class UsageError(Exception):
    """A problem with the command's inputs, found before any work starts (exit status 2)."""
