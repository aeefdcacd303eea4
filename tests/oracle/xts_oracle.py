#!/usr/bin/env python3
"""An independent AES-XTS oracle for cryptnbd and LUKS2 volumes (aes-xts-plain64).

It shares no code with cryptnbd: it decrypts data-segment sectors of a volume file with the
`cryptography` package (OpenSSL underneath), following dm-crypt's rules:

- the data segment starts at byte DATA_OFFSET of the file;
- sectors are SECTOR_SIZE bytes (512 or 4096), each one XTS data unit;
- the tweak of the sector at byte offset O from the start of the data segment is the 64-bit
  little-endian integer O / 512 + IV_TWEAK, zero-padded to 16 bytes (plain64 counts 512-byte
  units whatever the sector size);
- every sector is decrypted, including all-zero ciphertext (as dm-crypt does): a range that
  was never written decrypts to noise here, not to zeros.

Usage:
  xts_oracle.py --key KEYFILE --volume FILE --data-offset N --sector-size {512,4096}
                [--iv-tweak N] --range OFFSET:LENGTH [--range ...] [--out FILE]

KEYFILE holds the 64-byte volume key, raw (64 bytes) or as 128 hex digits. Each range is a
byte range of the data segment, of any alignment; the plaintext of the ranges is written,
concatenated in the order given, to FILE or stdout. The key is never printed. Exit status:
0 on success, 2 on a usage error or an unreadable input.
"""

import argparse
import os
import sys

try:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
except ImportError:  # pragma: no cover - reported to the Rust harness
    sys.stderr.write(
        "xts_oracle: the Python package 'cryptography' is missing: "
        "pip install cryptography (in a virtual environment)\n"
    )
    sys.exit(2)

KEY_LEN = 64
IV_UNIT = 512


def fail(msg):
    sys.stderr.write(f"xts_oracle: {msg}\n")
    sys.exit(2)


def read_key(path):
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as e:
        fail(f"cannot read the key file {path}: {e.strerror}")
    if len(data) == KEY_LEN:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    fail(
        f"the key file {path} holds {len(data)} bytes: expected {KEY_LEN} raw bytes "
        f"or {2 * KEY_LEN} hex digits"
    )


def parse_range(text):
    try:
        off, length = text.split(":", 1)
        off, length = int(off, 0), int(length, 0)
    except ValueError:
        fail(f"bad range '{text}': expected OFFSET:LENGTH")
    if off < 0 or length < 0:
        fail(f"bad range '{text}': negative")
    return off, length


def decrypt_range(f, key, data_offset, sector_size, iv_tweak, off, length):
    if length == 0:
        return b""
    start = off - off % sector_size
    end = -(-(off + length) // sector_size) * sector_size
    f.seek(data_offset + start)
    ct = f.read(end - start)
    if len(ct) != end - start:
        fail(f"range {off}:{length} is past the end of the file")
    out = bytearray()
    for i in range(0, len(ct), sector_size):
        iv = ((start + i) // IV_UNIT + iv_tweak) % (1 << 64)
        dec = Cipher(algorithms.AES(key), modes.XTS(iv.to_bytes(16, "little"))).decryptor()
        out += dec.update(ct[i : i + sector_size]) + dec.finalize()
    return bytes(out[off - start : off - start + length])


def main():
    p = argparse.ArgumentParser(description="Decrypt aes-xts-plain64 sectors of a volume file.")
    p.add_argument("--key", required=True, help="key file: 64 raw bytes or 128 hex digits")
    p.add_argument("--volume", required=True, help="volume (or image) file")
    p.add_argument("--data-offset", required=True, type=int, help="data segment offset, bytes")
    p.add_argument("--sector-size", required=True, type=int, choices=(512, 4096))
    p.add_argument("--iv-tweak", default=0, type=int, help="segment iv_tweak (default 0)")
    p.add_argument("--range", action="append", required=True, dest="ranges",
                   help="OFFSET:LENGTH in the data segment, repeatable")
    p.add_argument("--out", help="write the plaintext here instead of stdout")
    args = p.parse_args()

    key = read_key(args.key)
    ranges = [parse_range(r) for r in args.ranges]
    try:
        with open(args.volume, "rb") as f:
            plain = b"".join(
                decrypt_range(f, key, args.data_offset, args.sector_size, args.iv_tweak, o, n)
                for o, n in ranges
            )
    except OSError as e:
        fail(f"cannot read {args.volume}: {e.strerror}")
    except ValueError as e:  # e.g. a key whose two halves are equal (refused by XTS)
        fail(f"cannot decrypt: {e}")
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(plain)
    else:
        sys.stdout.buffer.write(plain)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
