"""JPEG headers: the checks a frame passes before a decoder sees it."""

from __future__ import annotations

from clipdata.errors import DataFormatError


def check_jpeg(data: bytes) -> bytes:
    """Reject what would stop the decoder mid-pipeline: not a JPEG, or cut before its end marker."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise DataFormatError("corrupt or truncated JPEG frame")
    return data


MAX_JPEG_SIDE = 16384  # beyond any video frame; a header claiming more is damaged, not a frame to decode


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF header, without decoding it; a size the decoder would fail on
    (zero, or beyond MAX_JPEG_SIDE) raises DataFormatError here, before the DALI graph, so the sample is
    skipped and named like any other unreadable one."""
    if data[:2] != b"\xff\xd8":
        raise DataFormatError("not a JPEG (no SOI marker)")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise DataFormatError("corrupt JPEG header")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            if not (0 < w <= MAX_JPEG_SIDE and 0 < h <= MAX_JPEG_SIDE):
                raise DataFormatError(f"JPEG header says {w}x{h} pixels: damaged")
            return w, h
        i += 2 + length
    raise DataFormatError("JPEG without a frame header")
