"""The library's errors. It knows nothing of HTTP: the service renders them in its one error shape
(`app.kit.errors`): an `InputError` is the caller's mistake (400), anything else a server error."""

from __future__ import annotations


class MLError(Exception):
    code = "ml_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code


class InputError(MLError, ValueError):
    """A request or dataset the library cannot use as given: the caller can fix it."""

    code = "invalid_request"


class TrainingDataError(InputError):
    """The training or validation data cannot be trained on (no records, unknown labels, ...)."""

    code = "invalid_training_data"


class ModelLoadError(MLError):
    code = "model_load_failed"
