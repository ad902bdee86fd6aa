"""Scattered receives: recvmsg(2) into an iovec array built with numpy (``protocol.pagewindow``).

The destination's counterpart of ``mig_source.gather``: predicted page records are read with
one ``recvmsg`` into [header slot, guest page, header slot, guest page, ...], so the kernel's
copy out of the socket is the only copy of a page on this side. Called through ctypes, like
``sendmsg`` there: it releases the GIL and needs no Python object per page.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from mig_source.gather import IOV_MAX, MSG_DONTWAIT, MsgHdr

_libc = ctypes.CDLL(None, use_errno=True)
_recvmsg = _libc.recvmsg
_recvmsg.argtypes = [ctypes.c_int, ctypes.POINTER(MsgHdr), ctypes.c_int]
_recvmsg.restype = ctypes.c_ssize_t


def recv_iov(fd: int, iov: np.ndarray) -> tuple[int, bool]:
    """Receive what the stream socket ``fd`` has queued, up to all that ``iov`` (a C-contiguous
    (n, 2) uint64 array of address, length; at most IOV_MAX rows, not all empty) describes,
    never blocking. Returns (bytes received, whether the peer closed); (0, False): nothing
    queued."""
    if len(iov) > IOV_MAX or not iov.flags.c_contiguous or iov.dtype != np.uint64:
        raise ValueError("recv_iov needs a C-contiguous uint64 iovec array of at most IOV_MAX rows")
    msg = MsgHdr()
    msg.msg_iov = iov.ctypes.data
    msg.msg_iovlen = len(iov)
    while True:
        n = _recvmsg(fd, ctypes.byref(msg), MSG_DONTWAIT)
        if n > 0:
            return n, False
        if n == 0:
            return 0, True
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0, False
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))
