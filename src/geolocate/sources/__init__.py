"""Image sources. Importing this package registers every built-in source."""
from .base import (SOURCES, ImageRecord, Skipped, SourceResult, get_source, heldout_records_dir, read_records, records_dir,
                   register_source, source_domain)
from . import earth, folder, manifest, mapillary  # noqa: F401  (registration)

__all__ = ["SOURCES", "ImageRecord", "Skipped", "SourceResult", "get_source", "heldout_records_dir", "read_records", "register_source",
           "records_dir", "source_domain"]
