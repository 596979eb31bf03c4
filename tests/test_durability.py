"""Usage records that survive a crash (contract "Usage records", issue 14).

An answer leaves only once its record is in the worker's journal (fsync'd, or in `written`
mode written), so SIGKILL — of a loaded server, or of one whose database is unreachable —
loses no answered request's record, and the replay at the next start writes none twice. The
journal's reader survives a torn last line and a corrupt one; its files do not pile up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.config import Settings
from tenants.database import make_engine
from tenants.usage.journal import UsageJournal, encode
from tenants.usage.records import UsageEntry
from tests.conftest import (
    FEATURES,
    LiveServer,
    admin_token,
    create_tenant,
    live_server,
    new_customer,
    server_env,
    stored_rows,
)
from tests.test_rate_limits import CuttableProxy, app_client, poll
from tests.test_usage import (
    LoadResult,
    all_records,
    assert_recorded_once,
    database_proxy,
    keep_predicting,
)

__all__ = ["database_proxy"]  # a fixture, used by name
INVALID = {**FEATURES, "sepal_length": -1}
MIXED = (FEATURES, FEATURES, FEATURES, INVALID)


def kill_under_load(server: LiveServer, headers: dict[str, str], result: LoadResult) -> None:
    """Load from 8 clients, then SIGKILL the server and all its workers mid-stream."""
    threads = [
        # Valid and invalid bodies: answers of 200, 422 and 429 (at the key's limit).
        threading.Thread(target=keep_predicting, args=(server, headers, result, MIXED))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    before = len(result.answered)
    poll(lambda: len(result.answered), lambda answered: answered >= before + 100, within=30)
    os.killpg(server.process.pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=30)
    server.process.wait()


def test_five_sigkills_under_load_lose_no_answered_record(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    # NOTE: a second between writes to the database, so that at each kill the last second's
    # answers are in the journal only; each restart replays them while it is loaded and killed
    # in its turn, so a kill can also land in the middle of a replay.
    env = server_env(
        database_url, model_dir, usage_journal_dir=str(tmp_path / "journal"),
        usage_flush_interval_ms="1000",
    )  # fmt: skip
    result = LoadResult()
    with live_server(env, tmp_path / "server.log", workers=2) as server:
        with server.client() as client:
            customer = new_customer(client, rate_limit="40/second")
        kill_under_load(server, customer.headers, result)
    tenant_id = customer.tenant["id"]
    [(written,)] = stored_rows(
        database_url, "SELECT count(*) FROM usage_records WHERE tenant_id = :t", t=tenant_id
    )
    assert written < len(result.answered), "some answered records should be in the journal only"
    for kill in range(2, 6):
        with live_server(env, tmp_path / f"server-{kill}.log", workers=2) as server:
            kill_under_load(server, customer.headers, result)
    assert {200, 422, 429} <= set(result.answered.values())
    restarted = live_server(env, tmp_path / "restarted.log", workers=2)
    with restarted as server, server.client() as client:
        token = admin_token(client)
        records = poll(
            lambda: all_records(client, token, tenant_id=tenant_id),
            lambda found: {r["request_id"] for r in found} >= set(result.answered),
        )
    assert_recorded_once(records, result)
    assert '"event":"usage_journal_replayed"' in server.output()


@pytest.mark.parametrize("durability", ["journal", "written"])
def test_sigkill_while_the_database_is_unreachable_loses_nothing(
    database_proxy: tuple[CuttableProxy, str], model_dir: Path, tmp_path: Path, durability: str
) -> None:
    proxy, proxied_url = database_proxy
    env = server_env(
        proxied_url, model_dir, usage_journal_dir=str(tmp_path / "journal"),
        usage_durability=durability,
    )  # fmt: skip
    result = LoadResult()
    with live_server(env, tmp_path / "server.log") as server, server.client() as client:
        customer = new_customer(client, rate_limit="100000/minute")
        warm = client.post("/v1/predict", json=FEATURES, headers=customer.headers)
        result.record(warm.headers["X-Request-ID"], warm.status_code)  # the key now cached
        proxy.cut()
        for _ in range(30):  # served from the key cache, journalled, the database away
            request_id = f"outage-{uuid.uuid4().hex}"
            response = client.post(
                "/v1/predict",
                json=FEATURES,
                headers={**customer.headers, "X-Request-ID": request_id},
            )
            result.record(request_id, response.status_code)
        assert set(result.answered.values()) == {200}
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    proxy.restore()
    with live_server(env, tmp_path / "restarted.log") as server, server.client() as client:
        token = admin_token(client)
        records = poll(
            lambda: all_records(client, token, tenant_id=customer.tenant["id"]),
            lambda found: len(found) >= len(result.sent),
        )
    assert_recorded_once(records, result)


def _entry(request_id: str, tenant_id: str) -> UsageEntry:
    return UsageEntry(
        id=uuid.uuid4().hex, at=datetime.now(UTC), request_id=request_id, tenant_id=tenant_id,
        key_id="k" * 12, method="POST", path="/v1/predict", status_code=200, items=1,
        latency_ms=1.0, model_version="v1",
    )  # fmt: skip


def test_a_torn_and_a_corrupt_journal_are_replayed_up_to_what_is_whole(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    tenant = f"t{uuid.uuid4().hex[:11]}"
    whole = [_entry(f"whole-{n}", tenant) for n in range(3)]
    corrupt = encode([_entry("corrupt", tenant)]).replace(b'"items":1', b'"items":9')
    torn = encode([_entry("torn", tenant)])[:-20]
    (journal / "usage-1-1.journal").write_bytes(
        encode(whole[:2]) + corrupt + encode(whole[2:]) + b"not json at all\n" + torn
    )
    # As a worker leaves its segments: zeroed ahead, written part of the way (the first one
    # torn in the middle of a record).
    zeroed = [_entry(f"zeroed-{n}", tenant) for n in range(2)]
    (journal / "usage-1-2.journal").write_bytes(encode(zeroed) + torn + bytes(8192))
    (journal / "usage-1-3.journal").write_bytes(encode(zeroed[:1]) + bytes(8192))
    expected = sorted(e.request_id for e in [*whole, *zeroed, zeroed[0]])
    # Replayed once: two starts, the second finding nothing left to do.
    for _ in range(2):
        with app_client(make_settings, usage_journal_dir=journal) as client:
            records = poll(
                lambda: all_records(client, admin_token(client), tenant_id=tenant),
                lambda found: len(found) >= len(set(expected)),
            )
        assert sorted(r["request_id"] for r in records) == sorted(set(expected))
        assert list(journal.glob("usage-*.journal")) == []


def test_a_sqlite_commit_is_on_disk_before_its_segment_can_go(tmp_path: Path) -> None:
    """A committed record's journal segment is deleted, so the commit itself must survive a
    power loss: SQLite's WAL under `synchronous=NORMAL` can undo commits not yet checkpointed;
    `FULL` syncs the WAL at each commit (PostgreSQL's commits are durable by default)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    with engine.connect() as connection:
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    engine.dispose()
    assert (mode, synchronous) == ("wal", 2)  # 2 is FULL


def journal_files(directory: Path) -> list[Path]:
    return list(directory.glob("usage-*.journal"))


@pytest.mark.parametrize("durability", ["journal", "written"])
def test_a_busy_journal_keeps_a_few_files_and_none_after_its_records_are_committed(
    tmp_path: Path, durability: str
) -> None:
    queued: list[UsageEntry] = []

    async def serve_and_commit() -> int:
        journal = UsageJournal(
            tmp_path, queued.extend, sync_before_answer=durability == "journal",
            recycle_bytes=4096,
        )  # fmt: skip
        journal.open()
        most_files = 0
        for round_ in range(40):
            waits = [journal.append(_entry(f"r{round_}-{n}", "t")) for n in range(25)]
            await asyncio.gather(*waits)
            await journal.drain()
            journal.committed(25)  # as the recorder does once the database has them
            most_files = max(most_files, len(journal_files(tmp_path)))
        await journal.drain()
        journal.close()
        return most_files

    most_files = asyncio.run(serve_and_commit())
    assert len(queued) == 1000
    assert [e.request_id for e in queued] == [f"r{r}-{n}" for r in range(40) for n in range(25)]
    assert most_files <= 4, "segments left behind should be deleted once committed"
    assert journal_files(tmp_path) == []


QUOTA = 100_000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB filesystem of its own (tmpfs), for a journal that runs out of room."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_journal_disk_answers_503_and_still_records_every_request(
    make_settings: Callable[..., Settings], database_url: str, small_disk: Path
) -> None:
    with app_client(make_settings, usage_journal_dir=small_disk) as client:
        token = admin_token(client)
        tenant = create_tenant(client, token, monthly_quota=QUOTA)
        customer = new_customer(client, token, tenant=tenant, rate_limit="100000/minute")
        answers = [
            client.post("/v1/predict", json=FEATURES, headers=customer.headers) for _ in range(600)
        ]
        in_order = [answer.status_code for answer in answers]
        statuses = Counter(in_order)
        refused = [answer for answer in answers if answer.status_code == 503]
        assert set(statuses) == {200, 503}, statuses
        # Full, it refuses until the records it holds are committed and its file deleted.
        assert 200 in in_order[in_order.index(503) :], "it should recover"
        assert {answer.json()["code"] for answer in refused} == {"overloaded"}
        # Only what was served counts against the month: a refused answer gave its quota back.
        last_served = next(a for a in reversed(answers) if a.status_code == 200)
        assert f'"quota";r={QUOTA - statuses[200]};' in last_served.headers["RateLimit"]
        sql = "SELECT status_code, items FROM usage_records WHERE tenant_id = :tenant"
        records = poll(
            lambda: Counter(
                map(tuple, stored_rows(database_url, sql, tenant=customer.tenant["id"]))
            ),
            lambda found: sum(found.values()) >= len(answers),
        )
    # One record an answer, as the caller saw it: a refused answer served no prediction.
    assert records == {(200, 1): statuses[200], (503, 0): statuses[503]}
