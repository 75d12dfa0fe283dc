"""A streaming reader of WADO-RS `multipart/related` answers that notices a broken answer.

dicomweb-client's decoder (`DICOMwebClient._decode_multipart_message`) buffers a part until the
next boundary whatever its size, yields whatever follows the last boundary when the stream stops
early, and parses each part into a pydicom Dataset (the bytes are gone). ResDx needs the bytes as
sent (the cache is content-addressed), a ceiling on one part's size, and "the answer ended before
its closing boundary" as its own reason; so this is its own ~80 lines, on the same HTTP session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipeline.errors import RejectedCase

CHUNK = 1 << 20


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a `multipart/related` Content-Type; RejectedCase otherwise."""
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise RejectedCase("pacs_bad_answer", f"the server answered {media[:40] or 'no content type'!r}, "
                                              "not multipart/related (is pacs.url a DICOMweb root?)")
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise RejectedCase("pacs_bad_answer", "the server's multipart answer names no boundary")


def _body(part: bytes) -> tuple[str, bytes]:
    """(Content-Type of the part, its body): a part is headers, a blank line, then the body."""
    head, sep, body = part.partition(b"\r\n\r\n")
    if not sep:
        raise RejectedCase("pacs_bad_answer", "a part of the server's answer has no header/body separator")
    ctype = ""
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-type":
            ctype = value.strip().decode("latin-1")
    return ctype, body


def iter_parts(chunks: Iterator[bytes], boundary: bytes, max_part_bytes: int,
               deadline: float | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield (content type, body) per part of a multipart body given as byte chunks.

    Memory is one part plus one chunk. Raises RejectedCase: `too_large` for a part above
    `max_part_bytes`, `pacs_truncated` when the chunks end before the closing boundary,
    `pacs_timeout` when `deadline` (time.monotonic) passes.
    """
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # the first boundary line then matches the delimiter too
    started = False
    for chunk in chunks:
        if deadline is not None and time.monotonic() > deadline:
            raise RejectedCase("pacs_timeout", "the server's answer did not complete within the case's time limit")
        buf += chunk
        while True:
            i = buf.find(delimiter)
            end = i + len(delimiter) + 2
            if i < 0 or len(buf) < end:
                if len(buf) > max_part_bytes + len(delimiter) + 2:
                    raise RejectedCase("too_large", f"one instance in the server's answer exceeds "
                                                    f"{max_part_bytes / 2**20:.0f} MiB (ingest.max_case_bytes)")
                break
            tail = bytes(buf[i + len(delimiter):end])
            if started:
                yield _body(bytes(buf[:i]))
            started = True
            del buf[:end]
            if tail == b"--":
                return
            if tail != b"\r\n":
                raise RejectedCase("pacs_bad_answer", "a boundary line in the server's answer is malformed")
    raise RejectedCase("pacs_truncated", "the server's multipart answer ended before its closing boundary "
                                         "(connection cut or server error mid-transfer)")
