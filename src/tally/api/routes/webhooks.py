"""``GET`` and ``POST /v1/webhook-secret`` (CONTRACT §8): the calling client's signing secret
for the webhooks Tally sends it (export completions, alerts), and its rotation."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.deps import AnyToken, RuntimeDep
from tally.runtime import Runtime
from tally.security.tokens import Principal
from tally.webhooks import secrets

router = APIRouter(tags=["webhooks"])
NO_STORE = {"Cache-Control": "no-store"}  # a secret is never kept by a cache


@router.get("/v1/webhook-secret", summary="This client's webhook signing secret",
            response_model=None,
            responses={200: {"model": answers.WebhookSecret}, **problems(*AUTHED)})
async def get_webhook_secret(principal: AnyToken, runtime: RuntimeDep) -> JSONResponse:
    return await _answer(secrets.current, runtime, principal)


@router.post("/v1/webhook-secret", summary="Rotate this client's webhook signing secret",
             response_model=None,
             responses={200: {"model": answers.WebhookSecret}, **problems(*AUTHED)})
async def rotate_webhook_secret(principal: AnyToken, runtime: RuntimeDep) -> JSONResponse:
    return await _answer(secrets.rotate, runtime, principal)


async def _answer(action: Callable[[sqlite3.Connection, str], str], runtime: Runtime,
                  principal: Principal) -> JSONResponse:
    secret = await asyncio.to_thread(action, runtime.meta, principal.client_id)
    return JSONResponse({"secret": secret}, headers=NO_STORE)
