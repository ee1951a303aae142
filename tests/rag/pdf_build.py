"""Write small real PDFs (one text line per page, Helvetica) without any PDF library."""
from __future__ import annotations

from pathlib import Path


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def write_pdf(path: Path, pages: list[str]) -> Path:
    """`pages[i]` becomes the text of page i+1 (one line each)."""
    n = len(pages)
    objs: dict[int, bytes] = {}
    font = 3
    kids = []
    objs[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    for i, text in enumerate(pages):
        page_id, content_id = 4 + 2 * i, 5 + 2 * i
        kids.append(f"{page_id} 0 R")
        stream = f"BT /F1 12 Tf 72 720 Td ({_escape(text)}) Tj ET".encode("latin-1")
        objs[page_id] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                         f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {content_id} 0 R >>").encode()
        objs[content_id] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    objs[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {n} >>".encode()
    objs[font] = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for oid in sorted(objs):
        offsets[oid] = len(out)
        out += b"%d 0 obj\n" % oid + objs[oid] + b"\nendobj\n"
    xref = len(out)
    size = max(objs) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for oid in range(1, size):
        out += b"%010d 00000 n \n" % offsets[oid]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    path.write_bytes(bytes(out))
    return path


def write_flate_bomb(path: Path, inflated_bytes: int, fill: bytes = b" ", text: str = "Bomb page") -> Path:
    """A one-page PDF whose FlateDecode content stream inflates to about `inflated_bytes` bytes.

    The stream is `BT ... (text) Tj ET` followed by `fill` repeated: a real, valid content
    stream (whitespace by default) that a reader has to inflate before it can parse. Building
    a 500 MB bomb needs ~1 MB of memory; the file is about 1/1000 of the inflated size."""
    import struct
    import zlib

    # Raw deflate, each 1 MiB block ended by a full flush: the compressor forgets its history
    # at every flush, so every full block compresses to the same bytes, which are repeated
    # instead of recomputed (a 500 MB bomb builds in well under a second). RFC 1950 framing
    # (header, Adler-32 of the inflated bytes) is added by hand.
    head = f"BT /F1 12 Tf 72 720 Td ({_escape(text)}) Tj ET\n".encode("latin-1")
    block = (fill * (1 << 20))[: 1 << 20]
    n_full, tail = divmod(max(0, inflated_bytes - len(head)), len(block))
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    last = comp.compress(block[:tail]) + comp.flush()
    check = zlib.adler32(head)
    for _ in range(n_full):
        check = zlib.adler32(block, check)
    check = zlib.adler32(block[:tail], check)
    stream = b"\x78\xda" + first + again * n_full + last + struct.pack(">I", check)
    objs = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        4: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
           b"/Contents 5 0 R >>",
        5: b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    }
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for oid in sorted(objs):
        offsets[oid] = len(out)
        out += b"%d 0 obj\n" % oid + objs[oid] + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 6\n0000000000 65535 f \n"
    for oid in range(1, 6):
        out += b"%010d 00000 n \n" % offsets[oid]
    out += b"trailer\n<< /Size 6 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    path.write_bytes(bytes(out))
    return path
