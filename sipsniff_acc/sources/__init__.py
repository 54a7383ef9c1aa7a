"""I/O edge: where frames come from. Everything here reads files or sockets."""

from sipsniff_acc.sources.pcapfile import (
    CapturePathError, CaptureReader, SourceError, check_capture, expand_paths, open_captures,
)

__all__ = ["CapturePathError", "CaptureReader", "SourceError", "check_capture", "expand_paths", "open_captures"]
