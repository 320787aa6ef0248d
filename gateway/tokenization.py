"""vLLM's tokenizer endpoints: POST /tokenize and POST /detokenize.

Clients use them to count a prompt's tokens against the context before sending it, and to read token
ids back as text. /tokenize gives exactly the ids the generation endpoints would feed the model: a
`prompt` as /v1/completions encodes it, `messages` as /v1/chat/completions renders and encodes them.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.tokenizer import encode_prompt
from gateway.protocol import parse_detokenize, parse_tokenize

if TYPE_CHECKING:
    from gateway.app import Gateway


def tokenizer_routes(gw: "Gateway") -> list[Route]:
    async def tokenize(request: Request) -> Response:
        body = await gw.read_body(request)
        req = parse_tokenize(body, gw.tokenizer)
        # off the loop: a long text takes a while to encode
        tokens = await asyncio.to_thread(_encode, gw.tokenizer, req.text, req.add_special_tokens)
        strs = [gw.tokens.text(t) for t in tokens] if req.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": gw.engine.engine.max_model_len,
                             "tokens": tokens, "token_strs": strs})

    async def detokenize(request: Request) -> Response:
        body = await gw.read_body(request)
        tokens = parse_detokenize(body, gw.vocab_size())
        return JSONResponse({"prompt": await asyncio.to_thread(gw.tokenizer.decode, tokens)})

    return [Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"])]


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return encode_prompt(tokenizer, text) if add_special_tokens else list(tokenizer.encode(text, add_special_tokens=False))
