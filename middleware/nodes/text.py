"""Token events to text chunks: incremental detokenization for the text topic.

Text for tokens at a position is the difference of two prefix decodes, so
multi-token characters and byte-level BPE merges come out right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from middleware.protocol import TextChunk


class TextStream:
    """Turns a session's token events into :class:`TextChunk` values, in order (a Sink)."""

    def __init__(
        self,
        tokenizer: Any,
        session_id: str,
        device_id: str,
        emit: Callable[[TextChunk], None],
        committed: Sequence[int] = (),
        seq: int = 0,
    ) -> None:
        """``committed`` and ``seq``: tokens already shown and the last chunk's seq before (a
        session resumed from the journal): their text is part of ``text``, no chunk is
        emitted for them again, and chunk numbers go on from ``seq``."""
        self._tok = tokenizer
        self.session_id = session_id
        self.device_id = device_id
        self._emit = emit
        self._seq = seq
        self.tokens: list[int] = list(committed)  # committed
        self.shown: list[int] = []  # provisional tokens, continuing `committed`
        self.finish_reason = ""
        self.lossy = False  # the verifier runs the opt-in relaxed (lossy) acceptance
        self.instance = ""  # the session instance, stamped on every chunk

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self._tok.decode(list(tokens), skip_special_tokens=True))

    def _delta(self, before: Sequence[int], added: Sequence[int]) -> str:
        head = self.decode(before)
        full = self.decode([*before, *added])
        return full[len(head) :] if full.startswith(head) else full

    def _chunk(self, kind: str, pos: int, n: int, text: str, final: bool = False) -> None:
        self._seq += 1
        self._emit(
            TextChunk(
                session_id=self.session_id,
                device_id=self.device_id,
                seq=self._seq,
                kind=kind,  # type: ignore[arg-type]
                pos=pos,
                n_tokens=n,
                text=text,
                final=final,
                lossy=self.lossy,
                instance=self.instance,
            )
        )

    # --- the Sink protocol (middleware.nodes.session.Sink) ---------------------------
    def committed(self, pos: int, tokens: Sequence[int], kind: str) -> None:
        text = self._delta(self.tokens[:pos], tokens)
        if kind == "confirmed":
            self.shown = self.shown[len(tokens) :]
        elif kind == "correction":
            self.shown = []
        self._chunk(kind, pos, len(tokens), text)
        self.tokens[pos:] = list(tokens)

    def provisional(self, pos: int, tokens: Sequence[int]) -> None:
        text = self._delta([*self.tokens, *self.shown], tokens)
        self.shown += list(tokens)
        self._chunk("provisional", pos, len(tokens), text)

    def finished(self, reason: str, committed: Sequence[int]) -> None:
        self.finish_reason = reason
        self._chunk("verified", len(committed), 0, "", final=True)

    @property
    def seq(self) -> int:
        """The last chunk's seq."""
        return self._seq

    @property
    def text(self) -> str:
        return self.decode(self.tokens)
