"""The AES-256-CTR transforms against NIST vectors and an independent ``cryptography`` cipher."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from iotd.relay.ctr import datagram_transform, stream_transform

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAIN = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST_CIPHER = bytes.fromhex(
    "601ec313775789a5b7a7f504bbf3d228"
    "f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988d"
    "dfc9c58db67aada613c2dd08457941a6"
)


def reference(key: bytes, iv: bytes, data: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data)


def test_stream_matches_nist_vector() -> None:
    enc = stream_transform(NIST_KEY, NIST_IV)
    assert enc(NIST_PLAIN) == NIST_CIPHER
    dec = stream_transform(NIST_KEY, NIST_IV)
    assert dec(NIST_CIPHER) == NIST_PLAIN


def test_stream_is_continuous_whatever_the_chunks() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    data = os.urandom(200_003)
    t = stream_transform(key, iv)
    out, i = [], 0
    for size in [1, 15, 16, 17, 1000, 65537, 3, 7]:
        out.append(t(data[i : i + size]))
        i += size
    out.append(t(data[i:]))
    assert b"".join(out) == reference(key, iv, data)


def test_each_stream_starts_at_the_iv() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    a, b = stream_transform(key, iv), stream_transform(key, iv)
    a(b"x" * 100)
    assert b(b"hello") == reference(key, iv, b"hello")


def test_datagram_restarts_keystream_each_time() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    t = datagram_transform(key, iv)
    for size in [1, 64, 1200, 8000, 65507]:
        d = os.urandom(size)
        assert t(d) == reference(key, iv, d)
    assert t(b"same") == t(b"same")
    assert t(t(b"round trip")) == b"round trip"


@pytest.mark.parametrize(("key_len", "iv_len"), [(16, 16), (24, 16), (31, 16), (32, 8), (32, 17)])
def test_bad_sizes_are_refused(key_len: int, iv_len: int) -> None:
    with pytest.raises(ValueError):
        stream_transform(bytes(key_len), bytes(iv_len))
    with pytest.raises(ValueError):
        datagram_transform(bytes(key_len), bytes(iv_len))
