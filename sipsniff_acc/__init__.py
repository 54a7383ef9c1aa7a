"""sipsniff-acc: Kamailio/OpenSER acc accounting records, produced by listening on the wire."""

__version__ = "0.1.0"

__all__ = ["__version__"]
