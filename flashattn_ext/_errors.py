"""Exceptions of the attention API. Each is also an instance of what torch's SDPA raises for the
same input (RuntimeError), so code written against torch keeps catching it, while the class says
what kind of problem it is (ValueError: a bad value or shape; TypeError: a bad type or dtype)."""


class AttentionValueError(ValueError, RuntimeError):
    """Invalid value or shape of an argument (the message names it)."""


class AttentionTypeError(TypeError, RuntimeError):
    """Invalid type or dtype of an argument (the message names it)."""


def translated(e):
    """The API's exception for one raised by the ops (ValueError/TypeError from C++'s
    TORCH_CHECK_VALUE/TORCH_CHECK_TYPE), same message; others are returned unchanged."""
    if isinstance(e, (AttentionValueError, AttentionTypeError)):
        return e
    if isinstance(e, ValueError):
        return AttentionValueError(*e.args)
    if isinstance(e, TypeError):
        return AttentionTypeError(*e.args)
    return e
