"""The job's parameters that users name (a light module: the CLI parses them without
importing trio)."""

import enum


class SyncMode(enum.StrEnum):
    FULL = "full"
    TOP = "top"
    NONE = "none"


class CopyMode(enum.StrEnum):
    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


class ErrorPolicy(enum.StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"


__all__ = ["CopyMode", "ErrorPolicy", "SyncMode"]
