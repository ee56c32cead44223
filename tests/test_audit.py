"""The tamper-evident audit log (CONTRACT §6, last bullet): what is recorded, that nothing
private is, and that every kind of tampering is caught with the right first bad entry."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.audit import checkpoints
from tally.audit.log import AuditLog, AuditUnavailable, log_path
from tally.audit.merkle import MerkleFrontier, leaf_hash
from tally.audit.verify import Verdict, verify_bytes, verify_data_dir
from tally.config import Settings
from tally.errors import StoreUnavailable
from tally.security.clients import create_client
from tests.conftest import make_event
from tests.server import TALLY, Server, new_client, token

CHECKPOINT_EVERY = 4
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
QUERY = {"metric": "ggr", "granularity": "1d", "from": "2025-10-22", "to": "2025-10-25",
         "filters": "brand_id:brand-7,region:EU"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                    audit_checkpoint_entries=CHECKPOINT_EVERY, audit_checkpoint_seconds=3600)


def register(data_dir: Path, scopes: str = "events:write analytics:read admin") -> tuple[str, str]:
    con = metadata.connect(data_dir)
    ids = create_client(con, "audited", scopes)
    con.close()
    return ids


def log_lines(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path(data_dir).read_bytes().splitlines()]


def checkpoint_rows(data_dir: Path) -> list[tuple[int, str, str, str, str]]:
    con = sqlite3.connect(data_dir / "meta.sqlite3")
    rows = con.execute("SELECT tree_size, root_hash, kid, note, signature FROM audit_checkpoints"
                       " ORDER BY tree_size").fetchall()
    con.close()
    return rows


# ---- RFC 9162 hashing ----------------------------------------------------------------------

# The RFC 6962/9162 reference leaves and roots (transparency-dev/merkle testonly), as data.
RFC_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f"]
RFC_ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
             "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
             "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
             "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
             "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
             "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
             "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]


def rfc_root(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) exactly as RFC 9162 §2.1.1 defines it (recursive, from the leaves' data)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)  # largest power of two below n
    return hashlib.sha256(b"\x01" + rfc_root(leaves[:k]) + rfc_root(leaves[k:])).digest()


def test_merkle_roots_match_the_rfc_vectors_and_definition():
    frontier = MerkleFrontier()
    assert frontier.root().hex() == RFC_ROOTS[0]
    for n, leaf in enumerate(RFC_LEAVES, start=1):
        frontier.append(leaf_hash(bytes.fromhex(leaf)))
        assert frontier.root().hex() == RFC_ROOTS[n], n
    data = [f"entry {i}".encode() * (i % 5 + 1) for i in range(70)]
    frontier = MerkleFrontier()
    for n, item in enumerate(data, start=1):
        frontier.append(leaf_hash(item))
        assert frontier.root() == rfc_root(data[:n]), n
        resumed = MerkleFrontier(frontier.size, frontier.nodes)  # as restored from a checkpoint
        assert resumed.root() == frontier.root()


# ---- what is recorded ------------------------------------------------------------------------


def test_token_query_and_admin_calls_are_recorded_without_secrets(client, settings):
    data = settings.data_dir
    cid, secret = register(data)
    good = client.post("/oauth/token", auth=(cid, secret),
                       data={"grant_type": "client_credentials", "scope": "analytics:read admin"})
    assert good.status_code == 200
    access = good.json()["access_token"]
    bad = client.post("/oauth/token", auth=(cid, "wrong-" + secret),
                      data={"grant_type": "client_credentials"})
    assert bad.status_code == 401
    # a secret typed into the client id field must not be recorded either
    typo = client.post("/oauth/token", data={"grant_type": "client_credentials",
                                             "client_id": secret, "client_secret": secret})
    assert typo.status_code == 401
    writer = client.post("/oauth/token", auth=(cid, secret),
                         data={"grant_type": "client_credentials", "scope": "events:write"})
    events = [make_event(occurred_at=f"2025-10-2{d}T10:00:00Z") for d in (2, 3, 3, 4)]
    ingest = client.post("/v1/events:batch", json=events,
                         headers={"Authorization": f"Bearer {writer.json()['access_token']}"})
    assert ingest.status_code == 202  # ingestion is not audited per request
    headers = {"Authorization": f"Bearer {access}",
               "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
    series = client.get("/v1/analytics/timeseries", params=QUERY, headers=headers)
    assert series.status_code == 200
    snooping = client.get("/v1/analytics/timeseries", headers=headers,
                          params={**QUERY, "filters": "brand_id:brand-7,player_id:p_19f3",
                                  "email": "someone@example.com", "jane_doe": "1"})
    assert snooping.status_code == 400
    anonymous = client.get("/v1/analytics/timeseries", params=QUERY)
    assert anonymous.status_code == 401
    admin = client.get("/v1/admin/fx-rates", headers=headers)
    assert admin.status_code == 200

    raw = log_path(data).read_bytes()
    for private in (secret, access, "p_19f3", "someone@example.com", "wrong-", "jane"):
        assert private.encode() not in raw
    entries = log_lines(data)
    assert [e["seq"] for e in entries] == list(range(1, 9))  # 4 token calls, 3 queries, 1 admin
    assert [e["kind"] for e in entries] == ["token"] * 4 + ["query"] * 3 + ["admin"]
    tok, wrong, typoed, _, query, snoop, anon, adm = entries
    assert tok["actor"] == {"client_id": cid} and tok["outcome"] == "ok"
    assert tok["params"] == {"scope": "admin analytics:read"} and tok["route"] == "/oauth/token"
    assert wrong["actor"] == {"client_id": cid} and wrong["status"] == 401
    assert wrong["outcome"] == "denied"
    assert typoed["actor"] == {"client_id": "(invalid)"}
    token_id = query["actor"]["token_id"]
    assert query["actor"]["client_id"] == cid and len(token_id) == 24
    assert query["route"] == "/v1/analytics/timeseries" and query["method"] == "GET"
    assert query["params"] == {"metric": "ggr", "granularity": "1d", "from": "2025-10-22",
                               "to": "2025-10-25"}
    assert query["filters"] == {"brand_id": ["brand-7"], "region": ["EU"]}
    assert query["rows"] == len(series.json()["series"]) == 3  # one per UTC day of the range
    assert query["status"] == 200 and query["trace_id"] == TRACE
    assert query["trace_id"] == series.headers["x-trace-id"]
    # names Tally knows are kept, any other name is not (it could be a person's name)
    assert snoop["withheld"] == ["(other)", "email", "filters.player_id"]
    assert snoop["filters"] == {"brand_id": ["brand-7"]} and snoop["outcome"] == "rejected"
    assert anon["actor"] is None and anon["outcome"] == "denied"
    assert adm["route"] == "/v1/admin/fx-rates" and adm["actor"]["token_id"] == token_id
    for entry in entries:
        assert set(entry) == {"seq", "time", "prev", "hash", "kind", "method", "route", "actor",
                              "params", "filters", "withheld", "rows", "status", "outcome",
                              "trace_id"}
        assert entry["time"].endswith("Z")
    # the chain, independently: each hash covers the canonical rest, prev links them
    prev = "0" * 64
    for entry in entries:
        body = {k: v for k, v in entry.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256(canonical.encode()).hexdigest() == entry["hash"]
        assert entry["prev"] == prev
        prev = entry["hash"]
    assert client.get("/v1/admin/audit/verify", headers=headers).json()["intact"] is True


def test_listing_pages_with_cursors_and_after(client, settings, headers):
    for _ in range(6):
        assert client.get("/v1/admin/fx-rates", headers=headers).status_code == 200
    total = len(log_lines(settings.data_dir))  # listing calls append more as we page
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/admin/audit", params=params, headers=headers).json()
        seen += [item["seq"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(1, len(seen) + 1)) and len(seen) >= total
    after = client.get("/v1/admin/audit", params={"after": 5, "limit": 2}, headers=headers)
    assert [item["seq"] for item in after.json()["items"]] == [6, 7]
    assert after.json()["items"][0] == log_lines(settings.data_dir)[5]
    bad = client.get("/v1/admin/audit", params={"cursor": "nonsense"}, headers=headers)
    assert bad.status_code == 400
    reader = client.get("/v1/admin/audit", headers={"Authorization": headers["Authorization"]
                                                    .replace("Bearer ", "Bearer x")})
    assert reader.status_code == 401


def test_published_checkpoint_is_an_rfc_9162_tree_head_signed_by_the_listed_key(client,
                                                                                settings,
                                                                                headers):
    for _ in range(9):
        client.get("/v1/admin/fx-rates", headers=headers)
    state = client.get("/v1/admin/audit/verify", headers=headers).json()
    assert state["intact"] is True and state["first_bad"] is None
    head = state["latest_checkpoint"]
    size = head["tree_size"]
    assert size >= 8  # signed by count (every 4 entries) in the checkpointer thread
    lines = log_path(settings.data_dir).read_bytes().splitlines()[:size]
    assert head["root_hash"] == rfc_root(lines).hex()
    origin, n, root_b64, stamp = head["note"].splitlines()
    assert origin == f"tally/audit/{head['kid']}" and int(n) == size
    assert base64.b64decode(root_b64).hex() == head["root_hash"] and stamp.startswith("time ")
    key = next(k for k in state["keys"] if k["kid"] == head["kid"])
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    public.verify(base64.b64decode(head["signature"]), head["note"].encode())  # raises if bad
    token_kids = {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    assert head["kid"] not in token_kids  # its own key, not a token signing key


def test_the_log_cannot_take_an_entry_so_the_answer_is_withheld(client, headers):
    client.app.state.runtime.audit.close()  # the real log, closed: appends now fail
    r = client.get("/v1/analytics/timeseries", params=QUERY, headers=headers)
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/audit-unavailable") and '"series"' not in r.text
    assert r.headers["x-trace-id"] == r.json()["trace_id"]
    assert client.get("/healthz").status_code == 200  # unaudited routes still answer


# ---- tampering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose audit log a real app wrote: 22 entries, checkpoints signed at 4, 8, ...
    20 (by hand, so the sizes do not depend on thread timing) and at shutdown (22)."""
    data = tmp_path_factory.mktemp("audit") / "data"
    settings = Settings(data_dir=data, regions="EU,UK,LATAM",
                        audit_checkpoint_entries=10_000, audit_checkpoint_seconds=3600)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        audit = client.app.state.runtime.audit
        cid, secret = register(data)
        for _ in range(2):
            client.post("/oauth/token", auth=(cid, "nope"), data={"grant_type":
                                                                  "client_credentials"})
        access = client.post("/oauth/token", auth=(cid, secret),
                             data={"grant_type": "client_credentials"}).json()["access_token"]
        headers = {"Authorization": f"Bearer {access}"}
        for i in range(19):
            if i % 2:
                client.get("/v1/analytics/timeseries", params=QUERY, headers=headers)
            else:
                client.get("/v1/admin/fx-rates", headers=headers)
            if audit.size % CHECKPOINT_EVERY == 0:
                audit.checkpoint()
    return data


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(pristine, target)
    return target


def reseal(entry: dict[str, Any], prev: str) -> bytes:
    body = {**{k: v for k, v in entry.items() if k != "hash"}, "prev": prev}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    body["hash"] = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


Mutation = tuple[str, Callable[[list[bytes]], bytes], int]


def mutations(lines: list[bytes], sizes: list[int]) -> Iterator[Mutation]:
    """(name, lines → new log bytes, expected first bad seq). Entries are 1-based."""
    n = len(lines)

    def joined(items: list[bytes]) -> bytes:
        return b"".join(line + b"\n" for line in items)

    def proven_before(seq: int) -> int:  # the first entry no earlier checkpoint vouches for
        return max((s for s in sizes if s < seq), default=0) + 1

    for k in range(1, n + 1):
        line = lines[k - 1]
        fields = {key: line.find(f'"{key}":'.encode()) for key in
                  ("seq", "hash", "prev", "status", "actor", "time")}
        positions = {0, len(line) // 3, len(line) // 2, len(line) - 1, len(line)}
        positions |= {p + len(key) + 4 for key, p in fields.items()}
        for pos in sorted(positions):
            for mask in (0x01, 0x20, 0xFF):
                def flip(ls: list[bytes], k: int = k, pos: int = pos, mask: int = mask) -> bytes:
                    raw = bytearray(joined(ls))
                    raw[sum(len(x) + 1 for x in ls[:k - 1]) + pos] ^= mask
                    return bytes(raw)
                yield f"flip entry {k} byte {pos} ^{mask:#x}", flip, k
        yield f"delete entry {k}", lambda ls, k=k: joined(ls[:k - 1] + ls[k:]), k
        yield (f"duplicate entry {k}",
               lambda ls, k=k: joined(ls[:k] + ls[k - 1:]), k + 1)
        if k < n:
            yield (f"swap entries {k} and {k + 1}",
                   lambda ls, k=k: joined(ls[:k - 1] + [ls[k], ls[k - 1]] + ls[k + 1:]), k)
            far = min(n, k + 5)
            yield (f"swap entries {k} and {far}",
                   lambda ls, k=k, far=far: joined(ls[:k - 1] + [ls[far - 1]] + ls[k:far - 1]
                                                   + [ls[k - 1]] + ls[far:]), k)
        yield f"truncate to {k - 1} entries", lambda ls, k=k: joined(ls[:k - 1]), k
        yield (f"truncate inside entry {k}",
               lambda ls, k=k: joined(ls[:k - 1]) + ls[k - 1][: len(ls[k - 1]) // 2], k)

        def rehash_one(ls: list[bytes], k: int = k) -> bytes:
            entry = json.loads(ls[k - 1])
            entry["status"] = 200 if entry["status"] != 200 else 204
            return joined(ls[:k - 1] + [reseal(entry, entry["prev"])] + ls[k:])
        yield f"edit entry {k} and recompute its hash", rehash_one, k if k < n else \
            proven_before(k)

        def rewrite_chain(ls: list[bytes], k: int = k) -> bytes:
            out, prev = list(ls[:k - 1]), json.loads(ls[k - 1])["prev"]
            for i in range(k - 1, len(ls)):
                entry = json.loads(ls[i])
                if i == k - 1:
                    entry["outcome"] = "ok" if entry["outcome"] != "ok" else "error"
                out.append(reseal(entry, prev))
                prev = json.loads(out[-1])["hash"]
            return joined(out)
        yield f"rewrite the chain consistently from entry {k}", rewrite_chain, proven_before(k)
    yield "broken last line", lambda ls: joined(ls) + b'{"actor":null,"filt', n + 1
    yield "empty line appended", lambda ls: joined(ls) + b"\n", n + 1
    yield "log deleted", lambda ls: b"", 1


def verify_log(data_dir: Path, content: bytes) -> Verdict:
    """What ``tally audit verify`` says of ``content``, without its one-second wait for a
    last line being written (the CLI test covers that wait)."""
    log_path(data_dir).write_bytes(content)
    return verify_data_dir(data_dir, torn_tail_retries=0)


def test_every_tampering_is_caught_with_the_right_first_bad_entry(copy):
    lines = log_path(copy).read_bytes().splitlines()
    sizes = [row[0] for row in checkpoint_rows(copy)]
    assert len(lines) == 22 and sizes == [4, 8, 12, 16, 20, 22]
    assert verify_data_dir(copy).intact
    tried = caught = 0
    wrong: list[str] = []
    for name, mutate, expected in mutations(lines, sizes):
        verdict = verify_log(copy, mutate(lines))
        tried += 1
        if not verdict.intact:
            caught += 1
            if verdict.first_bad is not None and verdict.first_bad.seq != expected:
                wrong.append(f"{name}: blamed {verdict.first_bad} instead of {expected}")
        else:
            wrong.append(f"{name}: not caught")
    assert wrong == [] and caught == tried
    assert tried >= 900  # the figure in docs/security.md
    print(f"\naudit tampering: {caught} of {tried} mutations caught")


def test_every_single_byte_flip_of_three_entries_is_caught(copy):
    raw = log_path(copy).read_bytes()
    con = sqlite3.connect(copy / "meta.sqlite3")
    heads, keys = checkpoints.load(con), checkpoints.public_keys(con)  # what verify reads
    con.close()
    starts = [0] + [i + 1 for i, b in enumerate(raw) if b == 0x0A]
    tried = 0
    for seq in (1, 11, 22):  # first, a middle one (two checkpoints away), the last
        for pos in range(starts[seq - 1], starts[seq]):  # every byte, the newline included
            flipped = bytearray(raw)
            flipped[pos] ^= 0x01
            verdict = verify_bytes(bytes(flipped), heads, keys)
            assert verdict.first_bad is not None and verdict.first_bad.seq == seq, (pos, verdict)
            tried += 1
    assert tried == starts[22] - starts[21] + starts[11] - starts[10] + starts[1]
    print(f"\naudit tampering: every one of {tried} single-byte flips caught")


def test_forged_checkpoints_are_caught(copy):
    con = sqlite3.connect(copy / "meta.sqlite3")
    size, root, kid, note, signature = con.execute(
        "SELECT tree_size, root_hash, kid, note, signature FROM audit_checkpoints "
        "WHERE tree_size = 8").fetchone()
    lines = log_path(copy).read_bytes().splitlines()
    # rewrite the chain from entry 6 and re-sign with a key of our own: wrong key
    entries = [json.loads(x) for x in lines]
    entries[5]["status"] = 299
    out, prev = lines[:5], entries[4]["hash"]
    for entry in entries[5:]:
        out.append(reseal(entry, prev))
        prev = json.loads(out[-1])["hash"]
    log_path(copy).write_bytes(b"".join(x + b"\n" for x in out))
    assert verify_data_dir(copy).first_bad.seq == 5  # checkpoint of 8 covers 5..8
    forger = Ed25519PrivateKey.generate()
    new_root = rfc_root(out[:8])
    forged_note = note.replace(note.splitlines()[2], base64.b64encode(new_root).decode())
    con.execute("UPDATE audit_checkpoints SET root_hash = ?, note = ?, signature = ? "
                "WHERE tree_size = 8", (new_root.hex(), forged_note,
                                        base64.b64encode(forger.sign(forged_note.encode()))
                                        .decode()))
    con.commit()
    verdict = verify_data_dir(copy)
    assert verdict.first_bad.seq == 5 and "invalid signature" in verdict.first_bad.reason
    # the unsigned columns cannot disagree with the signed note either
    con.execute("UPDATE audit_checkpoints SET root_hash = ?, note = ?, signature = ? "
                "WHERE tree_size = 8", (new_root.hex(), note, signature))
    con.commit()
    verdict = verify_data_dir(copy)
    assert verdict.first_bad.seq == 5 and "signed note" in verdict.first_bad.reason
    con.execute("UPDATE audit_checkpoints SET kid = 'nobody' WHERE tree_size = 4")
    con.commit()
    verdict = verify_data_dir(copy)
    assert verdict.first_bad.seq == 1 and "unknown key" in verdict.first_bad.reason
    con.close()
    assert size == 8 and note.splitlines()[0] == f"tally/audit/{kid}"


# ---- start-up, concurrency, live verification -------------------------------------------------


def test_restart_resumes_the_chain_and_cuts_a_torn_tail(copy):
    before = log_lines(copy)
    with log_path(copy).open("ab") as log:
        log.write(b'{"actor":{"client_id":"cl_')  # a crash in the middle of a write
    log = AuditLog(copy, checkpoint_entries=CHECKPOINT_EVERY, checkpoint_seconds=3600)
    seq = log.append({"kind": "admin", "note": "after restart"})
    log.close()
    after = log_lines(copy)
    assert after[:len(before)] == before
    assert after[len(before)]["event"] == "torn_tail_removed"
    assert after[len(before)]["bytes"] == len(b'{"actor":{"client_id":"cl_')
    assert seq == len(before) + 2 and after[-1]["prev"] == after[-2]["hash"]
    verdict = verify_data_dir(copy)
    assert verdict.intact and verdict.entries == len(before) + 2
    assert checkpoint_rows(copy)[-1][0] == verdict.entries  # close signed a last head


def test_a_log_truncated_below_its_checkpoint_refuses_to_open(copy):
    lines = log_path(copy).read_bytes().splitlines(keepends=True)
    log_path(copy).write_bytes(b"".join(lines[:10]))
    with pytest.raises(StoreUnavailable, match="truncated"):
        AuditLog(copy)
    log_path(copy).write_bytes(b"".join(lines))
    AuditLog(copy).close()  # intact again: opens


def test_concurrent_appends_keep_one_chain(tmp_path):
    log = AuditLog(tmp_path, checkpoint_entries=50, checkpoint_seconds=0.05)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(100):
            seq = log.append({"kind": "admin", "worker": w, "i": i})
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.verify().intact
    log.close()
    assert sorted(seqs) == list(range(1, 801))
    verdict = verify_data_dir(tmp_path)
    assert verdict.intact and verdict.entries == 800 and verdict.checkpoints >= 2


def test_event_loop_appends_share_syncs_and_keep_one_chain_with_threads(tmp_path):
    """append_async (the middleware's) and append (threads') interleave into one chain; the
    loop's entries are written in lots, so there are fewer syncs than entries."""
    log = AuditLog(tmp_path, checkpoint_entries=100, checkpoint_seconds=0.05)
    syncs = 0
    real_sync = log._sync

    def counted(seq: int) -> None:
        nonlocal syncs
        syncs += 1
        real_sync(seq)

    log._sync = counted  # type: ignore[method-assign]  # counts, the real fdatasync runs
    threaded: list[int] = []

    def worker() -> None:
        threaded.extend(log.append({"kind": "admin", "thread": i}) for i in range(50))

    async def main() -> list[int]:
        return list(await asyncio.gather(*(log.append_async({"kind": "query", "i": i})
                                           for i in range(400))))

    thread = threading.Thread(target=worker)
    thread.start()
    from_loop = asyncio.run(main())
    thread.join()
    assert sorted(from_loop + threaded) == list(range(1, 451))
    assert syncs < 450  # group commit: one fdatasync covers a lot
    log.close()
    verdict = verify_data_dir(tmp_path)
    assert verdict.intact and verdict.entries == 450


def test_event_loop_append_that_cannot_be_written_is_refused_and_the_log_goes_on(tmp_path):
    """A lot the file refuses (here: a descriptor that cannot write, as a full disk refuses)
    fails each of its waiters with an error (the middleware's 503); nothing hangs, and the
    next entries are written on the same chain."""
    log = AuditLog(tmp_path)
    first = asyncio.run(log.append_async({"kind": "query", "i": 0}))
    writable = log._fd
    log._fd = os.open(log.path, os.O_RDONLY)

    async def refused() -> list[Any]:
        return list(await asyncio.gather(*(log.append_async({"kind": "query", "i": i})
                                           for i in range(5)), return_exceptions=True))

    outcomes = asyncio.run(asyncio.wait_for(refused(), 10))
    assert all(isinstance(o, Exception) for o in outcomes)
    os.close(log._fd)
    log._fd = writable
    assert asyncio.run(log.append_async({"kind": "query", "i": 9})) == first + 1
    log.close()
    with pytest.raises(AuditUnavailable):
        asyncio.run(log.append_async({"kind": "query", "i": 10}))
    verdict = verify_data_dir(tmp_path)
    assert verdict.intact and verdict.entries == first + 1


def test_event_loop_appends_that_cannot_be_synced_are_refused(tmp_path, monkeypatch):
    """Written but not known to be on disk (the fdatasync fails, as on a failing device:
    injected, no disk here fails on demand): every waiter of the lot gets AuditUnavailable
    (the middleware's 503), none a seq, and the log goes on once syncs work again."""
    log = AuditLog(tmp_path)
    first = asyncio.run(log.append_async({"kind": "query", "i": 0}))
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)

    async def lot() -> list[Any]:
        return list(await asyncio.gather(*(log.append_async({"kind": "query", "i": i})
                                           for i in range(1, 6)), return_exceptions=True))

    outcomes = asyncio.run(asyncio.wait_for(lot(), 10))
    assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes
    monkeypatch.setattr(os, "fdatasync", real)
    assert asyncio.run(log.append_async({"kind": "query", "i": 6})) == first + 6
    log.close()
    verdict = verify_data_dir(tmp_path)  # the refused lines are in the chain, unanswered
    assert verdict.intact and verdict.entries == first + 6


def test_entries_queued_when_the_log_closes_are_written_not_lost(tmp_path):
    log = AuditLog(tmp_path)

    async def main() -> list[int]:
        pending = [asyncio.ensure_future(log.append_async({"kind": "query", "i": i}))
                   for i in range(200)]
        await asyncio.sleep(0)  # all queued
        await asyncio.to_thread(log.close)
        return list(await asyncio.wait_for(asyncio.gather(*pending), 10))

    assert sorted(asyncio.run(main())) == list(range(1, 201))
    verdict = verify_data_dir(tmp_path)
    assert verdict.intact and verdict.entries == 200


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_checkpoints_are_signed_by_count_and_by_time(tmp_path):
    by_count = AuditLog(tmp_path / "a", checkpoint_entries=5, checkpoint_seconds=3600)
    for i in range(4):
        by_count.append({"kind": "admin", "i": i})
    time.sleep(0.2)
    assert by_count.checkpointed == 0  # 4 entries: not yet
    by_count.append({"kind": "admin", "i": 4})
    assert wait_for(lambda: by_count.checkpointed == 5)
    by_count.close()
    by_time = AuditLog(tmp_path / "b", checkpoint_entries=1000, checkpoint_seconds=0.1)
    by_time.append({"kind": "admin"})
    assert wait_for(lambda: by_time.checkpointed == 1)
    by_time.close()
    assert [row[0] for row in checkpoint_rows(tmp_path / "a")] == [5]
    assert [row[0] for row in checkpoint_rows(tmp_path / "b")] == [1]


def test_truncation_after_the_last_checkpoint_is_caught_by_the_running_server(tmp_path):
    data = tmp_path / "data"
    settings = Settings(data_dir=data, regions="EU", audit_checkpoint_entries=1000,
                        audit_checkpoint_seconds=3600)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        cid, secret = register(data)
        access = client.post("/oauth/token", auth=(cid, secret),
                             data={"grant_type": "client_credentials"}).json()["access_token"]
        headers = {"Authorization": f"Bearer {access}"}
        for _ in range(3):
            client.get("/v1/admin/fx-rates", headers=headers)
        assert client.app.state.runtime.audit.checkpoint().tree_size == 4
        client.get("/v1/admin/fx-rates", headers=headers)
        client.get("/v1/admin/fx-rates", headers=headers)
        path = log_path(data)
        lines = path.read_bytes().splitlines(keepends=True)
        assert len(lines) == 6
        path.write_bytes(b"".join(lines[:5]))  # entry 6 removed: no checkpoint covers it yet
        assert verify_data_dir(data).intact  # offline this is undetectable (documented)
        state = client.get("/v1/admin/audit/verify", headers=headers).json()
        assert state["intact"] is False and state["first_bad"]["seq"] == 6
        assert "this server wrote 6" in state["first_bad"]["reason"]


def run_verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TALLY, "audit", "verify", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


def test_cli_exit_codes(copy, tmp_path):
    out = run_verify(copy)
    lines = log_path(copy).read_bytes().splitlines(keepends=True)
    n = len(lines)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"intact: {n} entries, {len(checkpoint_rows(copy))} checkpoints\n"
    raw = bytearray(log_path(copy).read_bytes())
    third = raw.index(b'"seq":3,')
    raw[third + 6] ^= 0x01  # entry 3 now claims seq 2
    log_path(copy).write_bytes(bytes(raw))
    out = run_verify(copy)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("tally: audit log is not intact: entry 3: ")
    assert len(out.stderr.splitlines()) == 1
    log_path(copy).write_bytes(b"".join(lines) + lines[0][:40])  # torn last line
    started = time.monotonic()
    out = run_verify(copy)
    assert out.returncode == 1 and f"entry {n + 1}: is incomplete" in out.stderr
    assert time.monotonic() - started >= 1.0  # it waited for a write in flight first
    missing = run_verify(tmp_path / "nothing-here")  # not a store at all (a typo)
    assert missing.returncode == 2 and "no Tally store" in missing.stderr
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "nothing-here" / "meta.sqlite3").write_bytes(b"")  # a store, without a log
    missing = run_verify(tmp_path / "nothing-here")
    assert missing.returncode == 2 and "no audit log" in missing.stderr


@pytest.mark.slow
def test_verify_while_the_server_process_runs(tmp_path):
    data = tmp_path / "data"
    creds = new_client(data)
    server = Server(data, env={"TALLY_AUDIT_CHECKPOINT_ENTRIES": "7",
                               "TALLY_AUDIT_CHECKPOINT_SECONDS": "0.2"})
    requests = 0
    stop = threading.Event()
    try:
        headers = token(server.url, *creds)
        requests += 1

        def load() -> None:  # every answered request is one entry, 429s included
            nonlocal requests
            with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
                while not stop.is_set():
                    assert http.get("/v1/admin/fx-rates").status_code in (200, 429)
                    requests += 1
                    time.sleep(0.005)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            time.sleep(0.5)
            for _ in range(3):
                out = run_verify(data)
                assert out.returncode == 0, out.stderr
                assert out.stdout.startswith("intact: ")
        finally:
            stop.set()
            worker.join()
        live = httpx.get(f"{server.url}/v1/admin/audit/verify", headers=headers).json()
        requests += 1
        assert live["intact"] is True and live["entries"] == requests - 1
    finally:
        server.stop()
    out = run_verify(data)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"intact: {requests} entries, ")
    assert checkpoint_rows(data)[-1][0] == requests  # shutdown signed the last head
