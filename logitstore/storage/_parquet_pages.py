"""Page headers of a Parquet column chunk, read without decompressing anything.

pyarrow allocates each page's buffer from the page header's ``uncompressed_page_size`` and
its values from the header's ``num_values``, both written by whoever wrote the file. The
footer's per-column totals are declared separately and nothing holds the pages to them, so
a 10 KB file could carry a page that claims gigabytes. Walking the headers first (a few
per column chunk; thrift compact protocol, Apache Thrift's ``TCompactProtocol``) bounds what
the read will allocate.

PageHeader fields used: 2 ``uncompressed_page_size``, 3 ``compressed_page_size``, and
``num_values`` (field 1) of the data page header (field 5), dictionary page header (7) and
data page header v2 (8).
"""

from __future__ import annotations

from dataclasses import dataclass

_STRUCT, _LIST, _SET, _MAP, _BINARY = 12, 9, 10, 11, 8
_MAX_NESTING = 16


class PageError(ValueError):
    """A page header that does not parse, or pages that run past their column chunk."""


@dataclass
class ChunkPages:
    """What a column chunk's pages declare in total."""

    uncompressed: int = 0
    values: int = 0
    largest_page: int = 0


class _Reader:
    def __init__(self, data: bytes | memoryview, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise PageError("page header runs past its column chunk")
        b = self.data[self.pos]
        self.pos += 1
        return int(b)

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise PageError("varint longer than 64 bits")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise PageError("page header nests too deeply")
        if kind in (1, 2):  # booleans live in the field header
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.pos += 8
        elif kind == _BINARY:
            size = self.varint()  # read before pos is, or the length byte is counted twice
            self.pos += size
        elif kind in (_LIST, _SET):
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(size):
                if head & 0x0F in (1, 2):  # a boolean element is one byte here
                    self.byte()
                else:
                    self.skip(head & 0x0F, depth + 1)
        elif kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    for t in (types >> 4, types & 0x0F):
                        self.byte() if t in (1, 2) else self.skip(t, depth + 1)
        elif kind == _STRUCT:
            self.struct(lambda _field, kind: self.skip(kind, depth + 1))
        else:
            raise PageError(f"unknown thrift type {kind}")
        if self.pos > self.end:
            raise PageError("page header runs past its column chunk")

    def struct(self, on_field) -> None:  # type: ignore[no-untyped-def]
        field = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            field = field + delta if delta else self.zigzag()
            on_field(field, kind)


def _header(r: _Reader) -> tuple[int, int, int]:
    """``(uncompressed size, compressed size, values)`` of the page header at ``r.pos``;
    values counts a data page's values (v1 or v2), not a dictionary page's entries."""
    found = {"uncompressed": -1, "compressed": -1, "values": 0}

    def sub(field: int, kind: int) -> None:
        if field == 1 and kind == 5:
            found["values"] = r.zigzag()
        else:
            r.skip(kind, 1)

    def top(field: int, kind: int) -> None:
        if field in (2, 3) and kind == 5:
            found["uncompressed" if field == 2 else "compressed"] = r.zigzag()
        elif field in (5, 8) and kind == _STRUCT:
            r.struct(sub)
        else:
            r.skip(kind, 0)

    r.struct(top)
    if found["uncompressed"] < 0 or found["compressed"] < 0 or found["values"] < 0:
        raise PageError("page header without valid sizes")
    return found["uncompressed"], found["compressed"], found["values"]


def walk(data: bytes | memoryview, start: int, length: int) -> ChunkPages:
    """Totals over the pages of the column chunk at ``data[start : start + length]``.

    Raises:
        PageError: a header that does not parse or a page past the chunk's end.
    """
    end = start + length
    if start < 0 or length < 0 or end > len(data):
        raise PageError("column chunk lies outside the file")
    pages = ChunkPages()
    r = _Reader(data, start, end)
    while r.pos < end:
        uncompressed, compressed, values = _header(r)
        r.pos += compressed
        if r.pos > end:
            raise PageError("page runs past its column chunk")
        pages.uncompressed += uncompressed
        pages.values += values
        pages.largest_page = max(pages.largest_page, uncompressed)
    return pages
