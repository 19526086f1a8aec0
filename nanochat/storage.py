"""The disk under a run: one run per checkpoint tag (a lock), room and write access checked before
training, temp files of dead processes removed, and a failed write turned into one line."""

import datetime
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import sys

from nanochat.common import UserError

# errno values that mean "this storage cannot take the write", not a bug: the run stops with one line
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}
LOCK_NAME = ".lock"

REPORT_BYTES = 1 << 20  # the markdown report and its loss-curve PNG


def free_bytes(path):
    """Free bytes on the filesystem holding path (or its nearest existing parent)."""
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return shutil.disk_usage(path).free


def disk_error(e):
    """The OSError behind e (torch.save wraps a failed write in a RuntimeError) when it is a storage
    fault, else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def not_writable(what, path, e, need=None):
    needed = f", {need:,} needed" if need else ""
    return UserError(f"the {what} {path} is not writable ({e.strerror}; {free_bytes(path):,} bytes free{needed}): fix its permissions or mount, or point NANOCHAT_BASE_DIR elsewhere")


def check_writable(path, need, what, detail=""):
    """path (created if missing) accepts a file and has `need` bytes free; else one line naming path,
    free and needed bytes (and `detail`, what the need is made of)."""
    probe = os.path.join(path, f".write_probe.tmp{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise not_writable(what, path, e, need)
    free = free_bytes(path)
    if free < need:
        raise UserError(f"the {what} {path} has {free:,} bytes free, {need:,} needed{detail}: free space there, "
                        f"or point NANOCHAT_BASE_DIR elsewhere")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(directory, log):
    """Deletes `*.tmp<pid>` files (half-written checkpoint files) whose process is gone. Called with the
    tag's lock held, so no live run of this tag is writing them; returns the removed paths."""
    removed = []
    for path in glob.glob(os.path.join(directory, "*.tmp*")):
        m = re.search(r"\.tmp(\d+)$", path)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            os.remove(path)
            removed.append(path)
    if removed:
        log(f"removed {len(removed)} temp files of stopped runs from {directory}")
    return removed


def remove_own_temps(directory):
    """Deletes this process's temp files (a save that failed midway)."""
    for path in glob.glob(os.path.join(directory, f"*.tmp{os.getpid()}")):
        try:
            os.remove(path)
        except OSError:
            pass


class RunLock:
    """One run per checkpoint tag: an exclusive fcntl.flock on <tag dir>/.lock, held by rank 0 from set-up
    until release() (train() releases it on return and on any exception). The file names the holder
    (pid, host, start time) for the error a second run prints.

    The kernel drops a flock when its process dies (kill -9 included), so a dead run never blocks the tag;
    the file it leaves is taken over with a warning naming it. On local filesystems this is exact. On NFS,
    Linux emulates flock with POSIX byte-range locks held by the server, so runs on different hosts exclude
    each other as long as the server's lock manager runs (NFSv4, or NFSv3 with lockd); a client mounted with
    `nolock` or `local_lock=flock|all`, Lustre without `-o flock`, and some FUSE filesystems lock per host
    only: there two hosts can both hold the lock. Where flock is refused outright the run warns and goes on
    unlocked."""

    def __init__(self, directory, log):
        self.dir = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = None
        self.created_dir = not os.path.isdir(directory)
        while True:
            try:
                os.makedirs(directory, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise not_writable("checkpoint directory", directory, e)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created_dir()
                raise UserError(f"{directory} is in use by another run ({_describe(holder)}): wait for it to end "
                                f"or stop it, or pick another --model-tag")
            except OSError as e:
                os.close(fd)
                log(f"Warning: cannot lock {self.path} ({e.strerror}): nothing stops a second run on this tag")
                return
            # the holder before us may have deleted the file between our open and our lock: lock the file
            # that the path names now, or two runs could each hold a different inode
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            log(f"Warning: took over the lock of {directory} from a run that is gone ({_describe(previous)})")
        holder = dict(pid=os.getpid(), host=socket.gethostname(), argv=" ".join(sys.argv),
                      since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self):
        """Deletes the lock file (while still holding it: a run waiting on the old file re-checks the path)
        and a tag directory this run created and left empty."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created_dir()

    def _remove_created_dir(self):
        if self.created_dir:
            try:
                os.rmdir(self.dir)  # only if empty: a run that saved nothing leaves nothing behind
            except OSError:
                pass


def _read_holder(fd):
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {}


def _describe(holder):
    if not holder:
        return "holder unknown: its lock file is empty or unreadable"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
