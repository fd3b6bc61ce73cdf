"""Image sources. Importing this package registers every built-in source."""
from .base import SOURCES, ImageRecord, Skipped, SourceResult, get_source, read_records, register_source, records_dir
from . import earth, folder, manifest  # noqa: F401  (registration)

try:  # the Mapillary client is optional until its package exists
    from . import mapillary  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["SOURCES", "ImageRecord", "Skipped", "SourceResult", "get_source", "read_records", "register_source", "records_dir"]
