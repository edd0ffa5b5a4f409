"""The one place that loads the compiled extension explaind_fast._C.

Importing explaind_fast._C registers the ops torch.ops.explaind_fast.* (schema, input checks, CPU
kernel). If it is missing, every caller gets the same message saying how to build it, instead of an
ImportError or an unknown-op error deep inside a call.
"""
import functools

_BUILD_HINT = (
    "explaind_fast: the compiled extension explaind_fast._C is not available ({err}). Build it from "
    "the repository root with\n    pip install --no-build-isolation -e \".[test]\"\n"
    "(without build isolation, so it compiles against the torch already installed)."
)


class ExtensionNotBuiltError(ImportError):
    """Raised when explaind_fast._C cannot be imported."""


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import explaind_fast._C (once) and return the module; raise ExtensionNotBuiltError if absent."""
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    try:
        from explaind_fast import _C
    except ImportError as err:
        raise ExtensionNotBuiltError(_BUILD_HINT.format(err=err)) from err
    return _C


def extension_available() -> bool:
    """True when explaind_fast._C can be imported."""
    try:
        load_extension()
    except ExtensionNotBuiltError:
        return False
    return True
