"""One pet report into /dev/null, timed, in a process of its own: `app` renders it as the worker
does (SQLAlchemy, Jinja2 template); `raw` is the baseline, an asyncpg cursor and f-strings.
Prints JSON: seconds, and how far peak memory grew (MB). DATABASE_URL names the database."""

import asyncio
import json
import os
import resource
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

import asyncpg

RAW_URL = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")


async def raw_report(out: TextIO) -> int:
    connection = await asyncpg.connect(RAW_URL)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            counts = await connection.fetch(
                "SELECT pet_type, count(*), max(id), max(char_length(name)) FROM pet"
                " GROUP BY pet_type ORDER BY pet_type"
            )
            total: int = sum(row[1] for row in counts)
            id_width = max([2, *(len(str(row[2])) for row in counts)])
            name_width = max([4, *(row[3] for row in counts)])
            type_width = max([4, *(len(row[0]) for row in counts)])
            write = out.write
            write(f"==== Pet report at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC ====\n")
            write(f"{total} pets in all, by type:\n")
            for pet_type, count, _, _ in counts:
                write(f"  {pet_type:<{type_width}}  {count}\n")
            header = f"{'ID':>{id_width}}  {'NAME':<{name_width}}  {'TYPE':<{type_width}}"
            write(f"\n{header}  CREATED (UTC)\n")
            cursor = connection.cursor(
                "SELECT id, name, pet_type, created_at FROM pet ORDER BY id", prefetch=2000
            )
            async for pet_id, name, pet_type, created in cursor:
                write(
                    f"{pet_id:>{id_width}}  {name:<{name_width}}  {pet_type:<{type_width}}"
                    f"  {created:%Y-%m-%d %H:%M:%S}\n"
                )
            write("==== end of report ====\n")
    finally:
        await connection.close()
    return total


async def app_report(out: TextIO) -> int:
    import worker
    from db import create_engine
    from settings import get_settings

    engine = create_engine(get_settings(), application_name="bench")
    try:
        template = worker.load_report_template()
        return await worker.write_report(
            engine,
            template,
            out,
            datetime.now(UTC),
        )
    finally:
        await engine.dispose()


def main() -> None:
    kind = sys.argv[1]
    if kind == "app":
        import worker  # noqa: F401 - imports (and their memory) come before the measurement

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with open(os.devnull, "w") as out:
        pets = asyncio.run(raw_report(out) if kind == "raw" else app_report(out))
    seconds = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"seconds": seconds, "rss_growth_mb": grown, "pets": pets}))


if __name__ == "__main__":
    main()
