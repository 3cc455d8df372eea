"""AES-256-CTR transforms for device links, built on ``cryptography``.

Encryption only covers the client <-> iotd leg.  In CTR mode encrypting and
decrypting are the same operation (XOR with the keystream), so one kind of
transform serves both directions:

- TCP: each direction is one continuous keystream starting at the IV, so chunk
  boundaries do not matter.  :func:`stream_transform` returns the bound
  ``update`` method of one encryptor context: the relay's hot path calls it
  directly, with no Python wrapper in between.
- UDP: every datagram is transformed on its own with the keystream restarted
  at the IV, so loss and reordering do not matter.  :class:`DatagramTransform`
  keeps the ``Cipher`` object and makes a fresh encryptor context per datagram
  (about 2 us each; cheaper than slicing a precomputed keystream for all but
  the smallest datagrams).

What this gives: payloads hidden from casual capture.  What it does not give:
integrity, or secrecy against anyone who sees both directions of a TCP link or
more than one datagram (the keystream repeats).  Clients should ask for a
fresh key per link and use TLS or a VPN where secrecy matters.
"""

from __future__ import annotations

from typing import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_SIZE = 32  # AES-256
IV_SIZE = 16  # one AES block: the initial counter value

Transform = Callable[[bytes], bytes]


def _cipher(key: bytes, iv: bytes) -> Cipher:
    if len(key) != KEY_SIZE:
        raise ValueError(f"AES-256 key must be {KEY_SIZE} bytes, got {len(key)}")
    if len(iv) != IV_SIZE:
        raise ValueError(f"CTR initialization vector must be {IV_SIZE} bytes, got {len(iv)}")
    return Cipher(algorithms.AES(key), modes.CTR(iv))


def stream_transform(key: bytes, iv: bytes) -> Transform:
    """One direction of a TCP link: a continuous keystream from ``iv``.

    Call once per direction; every call starts a new keystream at ``iv``.
    """
    return _cipher(key, iv).encryptor().update  # type: ignore[return-value]


class DatagramTransform:
    """UDP: each datagram gets the keystream from ``iv`` afresh."""

    __slots__ = ("_cipher",)

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._cipher = _cipher(key, iv)

    def __call__(self, datagram: bytes) -> bytes:
        return self._cipher.encryptor().update(datagram)  # type: ignore[no-any-return]


def datagram_transform(key: bytes, iv: bytes) -> Transform:
    """A per-datagram transform for a UDP link (same for both directions)."""
    return DatagramTransform(key, iv)
