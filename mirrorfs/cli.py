"""The ``mirrorfs`` command. Every verb but ``mount`` wraps the mount's files, so shell
users (``echo complete > MNT/.mirror/ctl``) and the CLI share one path.

Imports here are few and cheap: every command's start pays for them, and the waiting
``mirrorfs mount`` never imports trio or pyfuse3 (the daemon it forks does).
"""

from __future__ import annotations

import errno
import os
import sys
import time

from mirrorfs.sizes import format_size
from mirrorfs.system import alive

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (3 ms)
if TYPE_CHECKING:
    import argparse
    from typing import Any

ENDED = ("completed", "cancelled", "failed")


class CliError(Exception):
    pass


def ctl_path(mnt: str) -> str:
    return os.path.join(mnt, ".mirror", "ctl")


def read_status(mnt: str) -> dict[str, Any]:
    try:
        with open(ctl_path(mnt), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CliError(f"{mnt} is not a mirrorfs mount (no .mirror/ctl)") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise CliError(f"{mnt}: the mirrorfs daemon is gone (dead mount); "
                           f"`mirrorfs umount {mnt}` cleans it up") from None
        raise CliError(f"cannot read {ctl_path(mnt)}: {e.strerror}") from None
    import json

    try:
        obj = json.loads(data)
    except ValueError:
        raise CliError(f"{ctl_path(mnt)} did not return JSON") from None
    if not isinstance(obj, dict):
        raise CliError(f"{ctl_path(mnt)} did not return a JSON object")
    return obj


def send_command(mnt: str, command: str) -> None:
    path = ctl_path(mnt)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError as e:
        raise CliError(f"cannot open {path}: {e.strerror}") from None
    try:
        os.write(fd, (command + "\n").encode())
    except OSError as e:
        if e.errno == errno.EBUSY:
            state = _state_or_unknown(mnt)
            raise CliError(f"'{command}' refused: the job is {state}") from None
        if e.errno == errno.EINVAL:
            raise CliError(f"'{command}' is not a valid command") from None
        raise CliError(f"'{command}': {e.strerror}") from None
    finally:
        os.close(fd)


def _state_or_unknown(mnt: str) -> str:
    try:
        st = read_status(mnt)
    except CliError:
        return "in an unknown state"
    extra = " (paused)" if st.get("state") == "paused" else ""
    ready = "" if st.get("ready") or st.get("state") in ENDED else ", not ready yet"
    return f"{st.get('state')}{extra}{ready}"


def wait_for(mnt: str, until: str, timeout: float | None,
             poll_s: float = 0.1) -> tuple[int, dict[str, Any]]:
    """0 when reached, 1 when the job ended otherwise, 2 on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = read_status(mnt)
        state = st.get("state")
        if until == "ready":
            if st.get("ready") and state not in ("cancelled", "failed"):
                return 0, st
            if state in ENDED:
                return 1, st
        elif state in ENDED:
            return 0, st
        if deadline is not None and time.monotonic() >= deadline:
            return 2, st
        time.sleep(poll_s)


# ====================================================================== human view
def _bar(pct: float, width: int = 30) -> str:
    full = int(width * pct / 100)
    return "[" + "#" * full + "-" * (width - full) + "]"


def format_status(st: dict[str, Any]) -> str:
    state = st.get("state", "?")
    if state == "paused":
        state += " (in sync)" if st.get("ready") else " (bulk copy)"
    lines = [
        f"state:     {state}   serving: {st.get('serving')}   "
        f"target consistent: {'yes' if st.get('target_consistent') else 'no'}",
        f"progress:  {_bar(float(st.get('progress', 0)))} {st.get('progress', 0):5.1f}%",
        f"copied:    {format_size(st.get('copied_bytes', 0))}   "
        f"remaining: {format_size(st.get('remaining_bytes', 0))}   "
        f"size: {format_size(st.get('size', 0))}",
    ]
    rate = st.get("rate") or 0
    eta = st.get("eta_seconds")
    speed = st.get("speed") or 0
    lines.append(f"rate:      {format_size(rate)}/s   limit: "
                 f"{format_size(speed) + '/s' if speed else 'none'}   "
                 f"ETA: {_eta(eta)}")
    lines.append(f"mode:      sync {st.get('sync')}, {st.get('copy_mode')}, granularity "
                 f"{format_size(st.get('granularity', 0))}")
    if st.get("error"):
        lines.append(f"error:     {st['error']}")
    return "\n".join(lines)


def _eta(eta: float | None) -> str:
    if eta is None:
        return "-"
    m, s = divmod(int(eta), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


# ====================================================================== verbs
def cmd_status(a: argparse.Namespace) -> int:
    import json

    while True:
        st = read_status(a.mountpoint)
        if a.json:
            print(json.dumps(st), flush=True)
        else:
            if a.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            print(format_status(st), flush=True)
        if not a.watch or st.get("state") in ENDED:
            return 0
        time.sleep(1)


def cmd_wait(a: argparse.Namespace) -> int:
    rc, st = wait_for(a.mountpoint, a.until, a.timeout)
    if rc == 1:
        print(f"mirrorfs: the job ended {st.get('state')} before it was ready"
              + (f": {st['error']}" if st.get("error") else ""), file=sys.stderr)
    elif rc == 2:
        print(f"mirrorfs: timed out; the job is {st.get('state')}", file=sys.stderr)
    elif a.until == "done" and st.get("state") == "failed":
        print(f"mirrorfs: the job failed: {st.get('error')}", file=sys.stderr)
    return rc


def _ending(a: argparse.Namespace, command: str, want: str) -> int:
    send_command(a.mountpoint, command)
    if a.no_wait:
        return 0
    rc, st = wait_for(a.mountpoint, "done", a.timeout)
    if rc == 2:
        print(f"mirrorfs: timed out; the job is {st.get('state')}", file=sys.stderr)
        return 2
    if st.get("state") != want:
        print(f"mirrorfs: the job ended {st.get('state')}"
              + (f": {st['error']}" if st.get("error") else ""), file=sys.stderr)
        return 1
    return 0


def cmd_umount(a: argparse.Namespace) -> int:
    mnt = os.path.abspath(a.mountpoint)
    pid = None
    try:
        st = read_status(mnt)
        pid = st.get("pid")
        if st.get("state") not in ENDED:
            print(f"mirrorfs: note: the job was {st.get('state')}; it ends with the mount",
                  file=sys.stderr)
    except CliError:
        pass
    import subprocess

    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip()
        if "busy" in msg.lower():
            raise CliError(f"{mnt} is busy: a program still has the image open")
        if "not mounted" in msg.lower() or "not found in" in msg.lower():
            raise CliError(f"{mnt} is not mounted")
        raise CliError(f"cannot unmount {mnt}: {msg}")
    if isinstance(pid, int):
        deadline = time.monotonic() + a.timeout
        while alive(pid):
            if time.monotonic() > deadline:
                raise CliError(f"unmounted, but the daemon (pid {pid}) is still running")
            time.sleep(0.05)
    return 0


def cmd_mount(a: argparse.Namespace) -> int:
    if not a.foreground:
        from mirrorfs.launch import spawn_daemon

        def daemon(notify_fd: int) -> int:
            a.notify_fd = notify_fd
            return _run_daemon(a)

        return spawn_daemon(daemon)
    return _run_daemon(a)


def _run_daemon(a: argparse.Namespace) -> int:
    from mirrorfs import mount  # imports pyfuse3: only in the daemon
    from mirrorfs.params import MountOptions

    return mount.run_daemon(MountOptions.from_args(a, foreground=True))


def main(argv: list[str] | None = None) -> int:
    from mirrorfs.args import build_parser

    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    try:
        if a.verb == "mount":
            return cmd_mount(a)
        if a.verb == "status":
            return cmd_status(a)
        if a.verb == "wait":
            return cmd_wait(a)
        if a.verb == "complete":
            return _ending(a, "complete", "completed")
        if a.verb == "cancel":
            return _ending(a, "cancel force" if a.force else "cancel", "cancelled")
        if a.verb in ("pause", "resume"):
            send_command(a.mountpoint, a.verb)
            return 0
        if a.verb == "speed":
            send_command(a.mountpoint, f"speed {a.rate}")
            return 0
        if a.verb == "copy-mode":
            send_command(a.mountpoint, f"copy-mode {a.mode}")
            return 0
        if a.verb == "events":
            with open(os.path.join(a.mountpoint, ".mirror", "events"), "rb") as f:
                sys.stdout.buffer.write(f.read())
            return 0
        if a.verb == "umount":
            return cmd_umount(a)
    except CliError as e:
        print(f"mirrorfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mirrorfs status MNT | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    raise AssertionError(f"unhandled verb {a.verb}")
