"""headstart: transfer learning as a cached, versioned, observable pipeline."""

__version__ = "0.1.0"
