"""Sealing of stored values: AES-256-GCM, each value bound to where it belongs.

Used by the Redis store and bus (values leave the process) and by the embedded store's session
file (values land on disk): a dump of either reveals nothing readable, and a value moved to
another key no longer opens.
"""

from __future__ import annotations

import os
import secrets
import weakref
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class StoreCorrupt(Exception):
    """A stored value failed authentication: it was altered, or moved from another key."""


class Sealer:
    """AES-256-GCM sealing of values bound to where they belong (their associated data).

    Each process seals under its own sub-key, derived from the configured key and
    a random 16-byte epoch carried in every blob (and renewed after 2**24 seals, and
    in a forked child), so no two sealers ever share a sub-key. Under its sub-key a
    sealer numbers its nonces 0, 1, 2, ...: unique by construction, and no system call
    per value (a random nonce cost a getrandom(2) on the relay path, P4 in
    benchmarks/). Any process holding the configured key opens any blob.
    """

    VERSION = 1
    _EPOCH = 16
    _NONCE = 12
    _HEADER = 1 + _EPOCH + _NONCE
    _ROTATE_AFTER = 1 << 24

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the store key must be 32 bytes")
        self._key = key
        self._ciphers: OrderedDict[bytes, AESGCM] = OrderedDict()
        self._epoch = b""
        #: What every blob of this epoch starts with: the version, then the epoch.
        self._head = b""
        self._cipher: AESGCM | None = None
        self._sealed = 0
        #: The epoch opened last and its cipher: blobs mostly come in runs from one process.
        self._opened: tuple[bytes, AESGCM] = (b"", None)  # type: ignore[assignment]
        self._new_epoch()
        _sealers.add(self)

    def _new_epoch(self) -> None:
        self._epoch = secrets.token_bytes(self._EPOCH)
        self._head = bytes([self.VERSION]) + self._epoch
        self._cipher = self._cipher_for(self._epoch)
        self._sealed = 0

    def _cipher_for(self, epoch: bytes) -> AESGCM:
        cipher = self._ciphers.get(epoch)
        if cipher is not None:
            self._ciphers.move_to_end(epoch)
            return cipher
        sub_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=epoch, info=b"broker redis seal v1").derive(self._key)
        cipher = AESGCM(sub_key)
        self._ciphers[epoch] = cipher
        if len(self._ciphers) > 256:
            self._ciphers.popitem(last=False)
        return cipher

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        n = self._sealed
        if n >= self._ROTATE_AFTER:
            self._new_epoch()
            n = 0
        self._sealed = n + 1
        nonce = n.to_bytes(self._NONCE, "big")
        return b"".join((self._head, nonce, self._cipher.encrypt(nonce, plaintext, aad)))  # type: ignore[union-attr]

    def open(self, aad: bytes, blob: bytes) -> bytes:
        if len(blob) < self._HEADER + 16 or blob[0] != self.VERSION:
            raise StoreCorrupt("not a sealed value")
        epoch = blob[1 : 1 + self._EPOCH]
        opened, cipher = self._opened
        if epoch != opened:
            cipher = self._cipher_for(epoch)
            self._opened = (epoch, cipher)
        view = memoryview(blob)  # no copy of the ciphertext
        try:
            return cipher.decrypt(view[1 + self._EPOCH : self._HEADER], view[self._HEADER :], aad)
        except InvalidTag:
            raise StoreCorrupt("a stored value failed authentication") from None


#: Every sealer of this process, so a forked child can give each a new epoch before it seals anything.
_sealers: weakref.WeakSet[Sealer] = weakref.WeakSet()


def _new_epochs_after_fork() -> None:
    for sealer in list(_sealers):
        sealer._new_epoch()


os.register_at_fork(after_in_child=_new_epochs_after_fork)
