"""mirrorfs: mirror a live raw disk image to a new target through a FUSE mount."""

__version__ = "0.1.0"
