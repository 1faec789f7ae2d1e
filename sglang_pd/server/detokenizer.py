"""Detokenizer process: token ids -> text deltas, incrementally, with stop-string trimming.

Per request it keeps the ids so far and two offsets (the vLLM/TGI scheme): the text of
``ids[prefix:read]`` is already known, so only the tail is decoded each step; a tail ending in an
incomplete UTF-8 sequence (U+FFFD) is held back until the next token completes it. Text that could
still turn into a stop string is held back too, so a client never sees part of a stop string.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import zmq

from sglang_pd.server import ipc
from sglang_pd.server.child_process import setup_child
from sglang_pd.server.messages import BatchStrOut, BatchTokenOut, ShutdownReq, StrOut, TokenOut
from sglang_pd.server_args import ServerArgs
from sglang_pd.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
CONTEXT_TOKENS = 5  # tokens decoded before the new ones so merges and spaces come out right


@dataclass
class DecodeState:
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # every character decoded so far
    emitted: int = 0  # characters of ``text`` already sent


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def feed(self, out: TokenOut) -> str:
        """The text delta for ``out``; the final delta of a finished request applies stop trimming."""
        if self.tokenizer is None:
            return ""
        st = self.states.setdefault(out.rid, DecodeState())
        ids = out.new_token_ids
        reason = out.finish_reason
        matched = reason.get("matched") if reason and reason.get("type") == "stop" else None
        if isinstance(matched, int) and not out.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]  # the stop token itself is not part of the text
        for tok in ids:
            st.ids.append(tok)
            self._advance(st, out, final=False)
        if reason is None:
            hold = 0 if out.no_stop_trim else max((len(s) - 1 for s in out.stop), default=0)
            visible = max(len(st.text) - hold, st.emitted)
        else:
            del self.states[out.rid]
            self._advance(st, out, final=True)  # flush a held-back incomplete character
            if isinstance(matched, str) and not out.no_stop_trim and (cut := st.text.find(matched)) >= 0:
                st.text = st.text[:cut]
            visible = len(st.text)
        delta = st.text[st.emitted : visible]
        st.emitted = visible
        return delta

    def _advance(self, st: DecodeState, out: TokenOut, final: bool) -> None:
        """Append the text of ids[read_offset:] once it decodes to whole characters (or when final)."""
        if st.read_offset == len(st.ids):
            return
        prefix_text = self._decode(st.ids[st.prefix_offset : st.read_offset], out)
        new_text = self._decode(st.ids[st.prefix_offset :], out)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            st.text += new_text[len(prefix_text) :]
            st.prefix_offset = max(st.read_offset - CONTEXT_TOKENS, 0)
            st.read_offset = len(st.ids)

    def _decode(self, ids: list[int], out: TokenOut) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=out.skip_special_tokens,
            spaces_between_special_tokens=out.spaces_between_special_tokens,
        )


def run_detokenizer_process(args: ServerArgs, paths: ipc.IpcPaths) -> None:
    setup_child("detokenizer", args.log_level)
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or args.model_path)
    detok = IncrementalDetokenizer(tokenizer)
    ctx = zmq.Context()
    inbox = ipc.pull(ctx, paths.detokenizer_input)
    to_main = ipc.push(ctx, paths.main_output)
    while True:
        for msg in ipc.recv_all(inbox, 1000):
            if isinstance(msg, ShutdownReq):
                return
            if isinstance(msg, BatchTokenOut):
                ipc.send(to_main, BatchStrOut([StrOut(o, detok.feed(o)) for o in msg.outs]))
