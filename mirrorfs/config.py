"""The mirror's tunables: what the user sets (granularity, speed, buf-size, sync, copy
mode, error policies) and the internal ones, each with why it has its value."""

import dataclasses

from mirrorfs.params import CopyMode, ErrorPolicy, SyncMode

KiB, MiB = 1 << 10, 1 << 20


@dataclasses.dataclass(frozen=True)
class MirrorConfig:
    granularity: int = 64 * KiB
    buf_size: int = 16 * MiB  # data bytes in flight at once
    speed: int = 0  # bytes/s, 0 = unlimited
    sync: SyncMode = SyncMode.FULL
    copy_mode: CopyMode = CopyMode.BACKGROUND
    on_source_error: ErrorPolicy = ErrorPolicy.REPORT
    on_target_error: ErrorPolicy = ErrorPolicy.REPORT
    target_fresh: bool = False  # the target was created sparse by us: it reads as zeros
    max_op_bytes: int = 1 * MiB  # adjacent dirty chunks coalesce into ops up to this
    # Data per worker-thread call. 8 MiB: two batches fill the default buf-size, so one
    # copies while the next is picked; with four of 4 MiB the copies contended for the
    # target's inode and a lone one left the thread idle between trips (bulk copy of 1 GiB
    # on ext4: 0.31-0.41 s at 4x4 MiB, 0.28-0.30 s at 2x8 MiB; copy_file_range alone 0.25 s).
    batch_bytes: int = 8 * MiB
    ops_per_batch: int = 64
    drain_bytes: int = 4 * MiB  # remaining at which complete/cancel close the write gate
    max_backoff_s: float = 5.0
    checkpoint_s: float = 10.0  # how often copy progress is saved in the state file
    # While the guest does I/O, the copier keeps one op of max_op_bytes in flight and pauses
    # this long between them (dm-clone backs off the same way): the guest keeps the CPU.
    # 10 ms, not 5: with adaptive polling a 4 KiB request at queue depth 1 takes ~20 us, and
    # each batch's hand-offs cost the guest more (bench, rand read 4K qd1 during the copy:
    # 0.73x idle at 5 ms, 0.83x at 10 ms; the copy still ran at 70 of its 105 MiB/s).
    guest_backoff_s: float = 0.01
    max_logged_extents: int = 1024  # a checkpoint empties the activity log past this
