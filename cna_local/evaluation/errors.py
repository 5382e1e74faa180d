"""The evaluation's error type (its own module so that every part can raise it without import cycles)."""

from ..errors import CnaLocalError


class EvalError(CnaLocalError):
    """The evaluation cannot run with these inputs."""
