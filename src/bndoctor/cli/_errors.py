"""One map from exception type to a one-line message, a hint and an exit code."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BNDoctorError

EXIT_OK = 0
EXIT_FINDINGS = 1  # `bndoctor check` found error-level problems
EXIT_INTERNAL = 3
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


#: optional dependency -> (package, what to do): the extra to install, and the way around it where there is one
_EXTRAS = {
    "matplotlib": ("matplotlib", "pip install 'bndoctor[demo]' for the plots, or pass --no-plots"),
    "sklearn": ("scikit-learn", "pip install 'bndoctor[demo]' (the digits data set comes with scikit-learn)"),
    "mnist1d": ("mnist1d", "pip install 'bndoctor[demo]' (MNIST-1D is generated offline by the mnist1d package)"),
    "PIL": ("Pillow", "pip install 'bndoctor[demo]' (Pillow reads the image folder), or pass an .npz"),
    "tensorboard": ("tensorboard", "pip install 'bndoctor[tensorboard]', or write JSONL with sink='run.jsonl'"),
    "lightning": ("lightning", "pip install 'bndoctor[lightning]'"),
    "transformers": ("transformers", "pip install 'bndoctor[hf]'"),
    "timm": ("timm", "pip install timm (bndoctor imports it only for timm: MODELs)"),
    "torchvision": ("torchvision", "pip install torchvision (bndoctor imports it only for torchvision: MODELs)"),
}


@dataclass(frozen=True)
class Failure:
    message: str
    hint: str
    code: int


def describe(exc: BaseException) -> Failure:
    """Turn any exception into what the CLI prints. User errors never show a traceback."""
    if isinstance(exc, BNDoctorError):
        return Failure(str(exc), exc.hint, EXIT_USAGE)
    if isinstance(exc, FileNotFoundError):
        return Failure(f"file not found: {exc.filename or exc}", "check the path", EXIT_USAGE)
    if isinstance(exc, IsADirectoryError):
        return Failure(f"expected a file (got directory {exc.filename})", "pass a file path", EXIT_USAGE)
    if isinstance(exc, PermissionError):
        return Failure(f"permission denied: {exc.filename or exc}", "check file permissions", EXIT_USAGE)
    if isinstance(exc, ModuleNotFoundError):
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is not None:
            package, how = extra
            return Failure(f"this command needs {package} ({exc.name}), which is not installed", how, EXIT_USAGE)
        return Failure(str(exc), "install the missing package (see the message)", EXIT_USAGE)
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", "", EXIT_INTERRUPTED)
    one_line = " ".join(str(exc).split())
    return Failure(
        f"internal error: {type(exc).__name__}: {one_line}",
        "rerun with --debug for the traceback, and please report it",
        EXIT_INTERNAL,
    )
