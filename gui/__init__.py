"""The technician's PySide6 window."""
