"""I/O edge: where frames come from. Everything here reads files or sockets."""

from sipsniff_acc.sources.pcapfile import CaptureReader, SourceError, expand_paths, open_captures

__all__ = ["CaptureReader", "SourceError", "expand_paths", "open_captures"]
