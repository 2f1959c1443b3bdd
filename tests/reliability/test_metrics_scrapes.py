"""Issue 26, item 5: /metrics asks the workers once per interval, however many scrape at once.

Every scrape used to make the router ask every worker; 30 concurrent scrapers made chat 4.5x
slower. The router counts its fan-outs (`pdserve_router_metrics_fanouts_total`).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.reliability.gateways import gateway

SCRAPERS = 24


def fanouts(stack) -> float:
    return stack.router_metrics.get_sample_value("pdserve_router_metrics_fanouts_total") or 0.0


async def scrape_together(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*(client.get(url + "/metrics") for _ in range(n)))


def test_concurrent_scrapes_share_one_fan_out_to_the_workers(stack):
    with gateway(stack, metrics_cache_s=60.0) as url:
        before = fanouts(stack)
        scrapes = asyncio.run(scrape_together(url, SCRAPERS))
        assert all(r.status_code == 200 for r in scrapes)
        # Each got the workers' metrics, from the one fan-out they shared.
        for worker in stack.worker_ids():
            assert all(f'pdserve_kv_blocks_total{{worker="{worker}"}}' in r.text for r in scrapes)
        assert fanouts(stack) == before + 1
        # Within the interval a later scrape is served from the same fetch; the gateway's own
        # metrics are read fresh (the request counter has grown by the scrapes above).
        later = httpx.get(url + "/metrics", timeout=60).text
        assert fanouts(stack) == before + 1
        assert f'pdserve_gateway_requests_total{{endpoint="metrics",status="200"}} {float(SCRAPERS)}' in later


def test_after_the_interval_a_scrape_fetches_again(stack):
    with gateway(stack, metrics_cache_s=0.2) as url:
        before = fanouts(stack)
        assert httpx.get(url + "/metrics", timeout=60).status_code == 200
        time.sleep(0.3)  # past the interval: the next scrape must not be served the old text
        assert httpx.get(url + "/metrics", timeout=60).status_code == 200
        assert fanouts(stack) == before + 2
