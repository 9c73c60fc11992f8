"""A bare arq worker with one no-op job, for the baseline: `python -m bench.arq_worker
--redis URL --queue NAME --poll-delay S --max-jobs N`. Stops on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func


async def noop(ctx: dict[str, Any]) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--poll-delay", type=float, required=True)
    parser.add_argument("--max-jobs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = Worker(
        functions=[func(noop, name="noop")],
        queue_name=args.queue,
        redis_settings=RedisSettings.from_dsn(args.redis),
        poll_delay=args.poll_delay,
        max_jobs=args.max_jobs,
        log_results=False,
        handle_signals=True,
    )
    worker.run()


if __name__ == "__main__":
    main()
