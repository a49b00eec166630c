"""``mw-cli generate``'s handling of committed text a device sends again after a restart."""

from __future__ import annotations

from middleware.cli.render import TextRenderer
from middleware.cli.tools import _Resent
from middleware.protocol import TextChunk


def _c(seq: int, kind: str, pos: int, n: int, text: str) -> TextChunk:
    return TextChunk("s", "d", seq, kind, pos, n, text)  # type: ignore[arg-type]


def _out(chunks: list[TextChunk]) -> str:
    resent, renderer, out = _Resent(), TextRenderer(marked=False), ""
    for c in chunks:
        out += renderer.feed(*resent.chunk(c))
    return out


def test_text_resent_as_a_correction_after_a_restart_is_written_once() -> None:
    # seq 1 reached the broker, its acknowledgement did not reach the node before it died:
    # the resumed node sends tokens 0..4 again as a correction.
    chunks = [
        _c(1, "verified", 0, 2, "Hello"),
        _c(2, "correction", 0, 4, "Hello world"),
        _c(3, "verified", 4, 1, "!"),
    ]
    assert _out(chunks) == "Hello world!"


def test_a_correction_that_changes_committed_text_passes_through() -> None:
    chunks = [_c(1, "verified", 0, 2, "Hello"), _c(2, "correction", 1, 1, "p")]
    assert _out(chunks) == "Hellop"  # a pipe cannot take text back: the correction follows


def test_offline_corrections_are_unchanged() -> None:
    chunks = [
        _c(1, "verified", 0, 1, "A"),
        _c(2, "provisional", 1, 2, " bc"),
        _c(3, "correction", 1, 1, " d"),
    ]
    assert _out(chunks) == "A d"
