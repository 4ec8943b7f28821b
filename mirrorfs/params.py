"""The job's parameters that users name (a light module: the CLI parses them without
importing trio)."""

import dataclasses
import enum
from typing import Any, ClassVar


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


__all__ = ["CopyMode", "ErrorPolicy", "MountOptions", "SyncMode"]


@dataclasses.dataclass
class MountOptions:
    """What ``mirrorfs mount`` was asked for. The one table of its options: the command
    line (args.py) takes its defaults from here, and ``from_args`` builds it back from
    what argparse read, field by field."""

    source: str
    target: str
    mountpoint: str
    sync: SyncMode = SyncMode.FULL
    granularity: int = 64 << 10
    speed: int = 0
    buf_size: int = 16 << 20
    copy_mode: CopyMode = CopyMode.BACKGROUND
    on_source_error: ErrorPolicy = ErrorPolicy.REPORT
    on_target_error: ErrorPolicy = ErrorPolicy.REPORT
    name: str | None = None
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    log_file: str | None = None
    notify_fd: int | None = None
    state: str | None = None  # the state file (default: TARGET.mirrorfs for a file target)
    fresh: bool = False  # ignore an existing state file
    tls_ca: str | None = None  # nbds:// targets
    tls_cert: str | None = None
    tls_key: str | None = None
    checkpoint_s: float = 10.0  # --checkpoint-interval
    no_state: bool = False
    poll_us: int = 50  # adaptive polling for the next FUSE request (0: off)

    MIN_CHECKPOINT_S: ClassVar[float] = 0.5

    @classmethod
    def default(cls, name: str) -> Any:
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "MountOptions":
        """From argparse's namespace: every field it has, by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values.update(overrides)
        values["checkpoint_s"] = max(cls.MIN_CHECKPOINT_S, values.get("checkpoint_s", 10.0))
        return cls(**values)
