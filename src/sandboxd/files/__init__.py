"""The Files API without HTTP: path rules, reads, atomic streaming writes, listings, ranges.

Everything here blocks, except :mod:`.threads` and :func:`.upload.receive`,
which run those blocking steps in worker threads on behalf of the event loop.
"""

from .deleting import delete_file
from .errors import FilesError
from .listing import Entry, list_dir
from .paths import resolve
from .ranges import ByteRange, RangeNotSatisfiable, parse_range
from .reading import FileReader
from .staging import StagedFile
from .threads import Serial
from .upload import receive

__all__ = [
    "ByteRange",
    "Entry",
    "FileReader",
    "FilesError",
    "RangeNotSatisfiable",
    "Serial",
    "StagedFile",
    "delete_file",
    "list_dir",
    "parse_range",
    "receive",
    "resolve",
]
