"""Which HTTP answer each engine (and files) exception gets: the one table.

The engine raises exceptions that say what went wrong (``SpawnError`` with a
machine code, ``ProcessNotFound``, ``NameInUse``...) and knows nothing of HTTP.
This module is the only place that turns them into a status and a code; the
routes let them through :func:`engine_errors` (or the error middleware asks
:func:`to_api_error`). The same condition thus gets the same answer on every
route: ``CGROUP_FAILED`` is a 500 for a process and a terminal alike.

Never 502, 503 or 504 here: the official SDK retries those, and a retried
start would start the process twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..engine import (
    NameInUse,
    ProcessNotFound,
    SpawnError,
    StdinNotWritable,
    SupervisionStopped,
    TooManySessions,
)
from ..files import FilesError
from ..files import errors as file_codes
from .errors import ApiError

# Exceptions whose class alone decides the answer: class -> (status, code).
BY_CLASS: dict[type[Exception], tuple[int, str]] = {
    ProcessNotFound: (404, "NOT_FOUND"),
    NameInUse: (409, "NAME_IN_USE"),
    SupervisionStopped: (409, "PROCESS_DELETED"),
    StdinNotWritable: (400, "STDIN_NOT_WRITABLE"),
    TooManySessions: (429, "TOO_MANY_SESSIONS"),
}

# A SpawnError's status by its code; every code not listed is the client's
# mistake (400: a missing command, a bad user, a working_dir that is a file...).
SPAWN_STATUS: dict[str, int] = {
    "USER_SWITCH_DENIED": 403,
    "SHUTTING_DOWN": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CGROUP_FAILED": 500,
}
SPAWN_DEFAULT_STATUS = 400

# A FilesError's status by its code; a code not listed is a 500.
FILES_STATUS: dict[str, int] = {
    file_codes.INVALID_PATH: 400,
    file_codes.IS_DIRECTORY: 400,
    file_codes.NOT_A_DIRECTORY: 400,
    file_codes.NOT_A_REGULAR_FILE: 400,
    file_codes.INCOMPLETE_BODY: 400,
    file_codes.PATH_TRAVERSAL: 403,
    file_codes.PERMISSION_DENIED: 403,
    file_codes.READ_ONLY_FILESYSTEM: 403,
    file_codes.NOT_FOUND: 404,
    file_codes.FILE_BUSY: 409,
    file_codes.FILE_TOO_LARGE: 413,
    file_codes.RESOURCE_EXHAUSTED: 429,
    file_codes.INSUFFICIENT_STORAGE: 507,
    file_codes.IO_ERROR: 500,
}


def to_api_error(exc: BaseException) -> ApiError | None:
    """The API error for an engine or files exception; None for anything else."""
    if isinstance(exc, SpawnError):
        return ApiError(SPAWN_STATUS.get(exc.code, SPAWN_DEFAULT_STATUS), exc.code, exc.message)
    if isinstance(exc, FilesError):
        return ApiError(FILES_STATUS.get(exc.code, 500), exc.code, exc.message)
    for cls in type(exc).__mro__:
        answer = BY_CLASS.get(cls)  # type: ignore[arg-type]
        if answer is not None:
            return ApiError(answer[0], answer[1], str(exc))
    return None


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Let engine exceptions out of a route as the API errors this table gives them."""
    try:
        yield
    except Exception as exc:
        api = to_api_error(exc)
        if api is None:
            raise
        raise api from None
