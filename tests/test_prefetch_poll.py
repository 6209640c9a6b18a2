"""The poller: a followed tag that moves upstream is offered once, with its new digest.

Against a real `docker-registry` (images pushed with `skopeo copy`), one poll at a time with
`poll_once()`: no test waits on a clock. The failure paths that a real registry cannot play on
demand (one tag's HEAD failing while the others answer) use a small fake upstream. The run loop
is checked with a short interval, synchronised on the sink, never on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from harness.images import TestImage, TestImages
from harness.memory_runtime import RecordingSink
from harness.registry import Registry

from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import Follow, ImageRef, PushEvent
from mirror.prefetch.poll import Poller
from mirror.upstream.client import ManifestRef, UpstreamClient
from mirror.upstream.registries import UpstreamMap

LOGGER = "mirror.prefetch.poll"
REPOSITORY = "team/app"


@dataclass
class Claim:
    """`may_poll`, answering `allowed` and recording what it was asked."""

    allowed: bool = True
    asked: list[str] = field(default_factory=list)

    async def __call__(self, match: str) -> bool:
        self.asked.append(match)
        return self.allowed


def pushed(registry: Registry, tag: str, image: TestImage) -> PushEvent:
    digest = parse_digest(image.manifest_digest)
    return PushEvent(ImageRef(registry.host, REPOSITORY, tag, digest), "poll")


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


@pytest.fixture
async def upstream(registry: Registry) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(UpstreamMap({registry.host: registry.url}), None, Metrics())
    await client.start()
    yield client
    await client.close()


@pytest.fixture
def make_poller(
    registry: Registry, upstream: UpstreamClient
) -> Callable[..., tuple[Poller, RecordingSink, Claim]]:
    def make(tags: str = "prod-*", *, poll: float = 30.0) -> tuple[Poller, RecordingSink, Claim]:
        sink, claim = RecordingSink(), Claim()
        follow = Follow(f"{registry.host}/{REPOSITORY}:{tags}", poll=poll)
        return Poller([follow], upstream, sink, may_poll=claim), sink, claim

    return make


# --- against a real registry ------------------------------------------------------------------


async def test_the_first_poll_offers_the_tag_then_only_moves(
    registry: Registry,
    test_images: TestImages,
    make_poller: Callable[..., tuple[Poller, RecordingSink, Claim]],
) -> None:
    first, second = test_images.docker_v2, test_images.index
    await asyncio.to_thread(first.push_as, registry.host, REPOSITORY, "prod-1")
    await asyncio.to_thread(first.push_as, registry.host, REPOSITORY, "dev-1")  # not followed
    poller, sink, claim = make_poller()

    assert await poller.poll_once() == [pushed(registry, "prod-1", first)]
    assert sink.events == [pushed(registry, "prod-1", first)]
    assert claim.asked == [f"{registry.host}/{REPOSITORY}:prod-*"]

    # Unchanged: nothing.
    assert await poller.poll_once() == []

    # Re-pushed with other content: the new digest, once.
    await asyncio.to_thread(second.push_as, registry.host, REPOSITORY, "prod-1")
    assert await poller.poll_once() == [pushed(registry, "prod-1", second)]
    assert await poller.poll_once() == []

    # A new matching tag: that one only.
    await asyncio.to_thread(first.push_as, registry.host, REPOSITORY, "prod-2")
    assert await poller.poll_once() == [pushed(registry, "prod-2", first)]
    assert len(sink.events) == 3


async def test_a_node_that_may_not_poll_asks_nothing_upstream(
    registry: Registry,
    test_images: TestImages,
    make_poller: Callable[..., tuple[Poller, RecordingSink, Claim]],
) -> None:
    await asyncio.to_thread(test_images.docker_v2.push_as, registry.host, REPOSITORY, "prod-1")
    poller, sink, claim = make_poller()
    assert await poller.poll_once() != []
    registry.clear_access_log()

    claim.allowed = False
    assert await poller.poll_once() == [] and await poller.poll_once() == []
    assert registry.requests() == []
    assert len(claim.asked) == 3

    # Back as the poller: what it saw is stale, so every matching tag is offered again.
    claim.allowed = True
    assert await poller.poll_once() == [pushed(registry, "prod-1", test_images.docker_v2)]
    assert len(sink.events) == 2


async def test_an_unreachable_upstream_is_logged_once_and_polling_goes_on(
    registry: Registry,
    test_images: TestImages,
    make_poller: Callable[..., tuple[Poller, RecordingSink, Claim]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await asyncio.to_thread(test_images.docker_v2.push_as, registry.host, REPOSITORY, "prod-1")
    poller, _, _ = make_poller()
    registry.stop()
    assert await poller.poll_once() == []
    assert await poller.poll_once() == []
    (warning,) = warnings(caplog)
    assert warning.startswith(f"polling {registry.host}/{REPOSITORY}:prod-*: cannot list tags:")

    await asyncio.to_thread(registry.start)
    assert await poller.poll_once() == [pushed(registry, "prod-1", test_images.docker_v2)]
    assert f"polling {registry.host}/{REPOSITORY}:prod-* works again" in caplog.text
    assert len(warnings(caplog)) == 1


async def test_a_repository_that_does_not_exist_is_logged_once(
    registry: Registry, upstream: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    sink = RecordingSink()
    follow = Follow(f"{registry.host}/no/such:*", poll=30.0)
    poller = Poller([follow], upstream, sink, may_poll=Claim())
    assert await poller.poll_once() == [] and await poller.poll_once() == []
    assert warnings(caplog) == [
        f"polling {follow.match}: {registry.host}/no/such does not exist "
        "(retried every interval; logged once)"
    ]


async def test_a_re_read_file_keeps_what_was_seen(
    registry: Registry,
    test_images: TestImages,
    upstream: UpstreamClient,
) -> None:
    image = test_images.docker_v2
    for tag in ("prod-1", "dev-1"):
        await asyncio.to_thread(image.push_as, registry.host, REPOSITORY, tag)
    prod = Follow(f"{registry.host}/{REPOSITORY}:prod-*", poll=30.0)
    dev = Follow(f"{registry.host}/{REPOSITORY}:dev-*", poll=60.0)
    sink = RecordingSink()
    poller = Poller([prod], upstream, sink, may_poll=Claim())
    assert len(await poller.poll_once()) == 1

    # The same follow again, for other nodes too, and a new one: only the new one offers.
    poller.set_follows([prod, Follow(prod.match, {"tier": "web"}, 10.0), dev])
    assert poller.matches == (prod.match, dev.match)
    registry.clear_access_log()
    assert await poller.poll_once() == [pushed(registry, "dev-1", image)]
    lists = [e for e in registry.requests() if e.path.endswith("/tags/list")]
    assert len(lists) == 2, "one list per match, not per follow"

    # Dropped, then followed again: offered again.
    poller.set_follows([dev])
    assert await poller.poll_once() == []
    poller.set_follows([dev, prod])
    assert await poller.poll_once() == [pushed(registry, "prod-1", image)]


async def test_follows_without_poll_or_with_a_glob_are_not_polled(
    registry: Registry, upstream: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    claim = Claim()
    follows = [
        Follow(f"{registry.host}/{REPOSITORY}:*"),
        Follow(f"{registry.host}/team/*:*", poll=30.0),  # the file loader refuses this
        Follow("not a pattern", poll=30.0),
    ]
    poller = Poller(follows, upstream, RecordingSink(), may_poll=claim)
    assert poller.matches == ()
    assert await poller.poll_once() == []
    assert claim.asked == []
    assert len(warnings(caplog)) == 2


async def test_the_run_loop_polls_and_survives_errors(
    registry: Registry, test_images: TestImages, upstream: UpstreamClient
) -> None:
    await asyncio.to_thread(test_images.docker_v2.push_as, registry.host, REPOSITORY, "prod-1")
    sink = RecordingSink()
    calls = 0

    async def flaky(match: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the DHT is not up yet")
        return True

    # Below the file's minimum: the poller itself takes any interval.
    follow = Follow(f"{registry.host}/{REPOSITORY}:prod-*", poll=0.05)
    poller = Poller([follow], upstream, sink, may_poll=flaky)
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            await sink.arrived.wait()
        assert sink.events == [pushed(registry, "prod-1", test_images.docker_v2)]
        assert calls >= 2
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- with a fake upstream -----------------------------------------------------------------

DIGEST_A = parse_digest("sha256:" + "a" * 64)
DIGEST_B = parse_digest("sha256:" + "b" * 64)


@dataclass
class FakeUpstream:
    tags: list[str]
    digests: dict[str, str]
    failing: set[str] = field(default_factory=set)

    async def list_tags(self, registry: str, repository: str) -> list[str] | None:
        return list(self.tags)

    async def head_manifest(
        self, registry: str, repository: str, reference: str, *, timeout: float
    ) -> ManifestRef | None:
        if reference in self.failing:
            raise UpstreamError(f"{reference}: upstream answered 503")
        digest = self.digests.get(reference)
        return None if digest is None else ManifestRef(digest, "application/json", 10)


def refs_of(events: list[PushEvent]) -> list[str]:
    return [str(event.ref) for event in events]


async def test_a_tag_whose_head_fails_keeps_its_digest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    fake = FakeUpstream(["v1", "v2"], {"v1": str(DIGEST_A), "v2": str(DIGEST_A)})
    poller = Poller([Follow("reg.io/app:v*", poll=30.0)], fake, RecordingSink(), may_poll=Claim())
    assert refs_of(await poller.poll_once()) == [
        f"reg.io/app:v1@{DIGEST_A}",
        f"reg.io/app:v2@{DIGEST_A}",
    ]

    fake.failing = {"v2"}
    fake.digests["v1"] = str(DIGEST_B)
    assert refs_of(await poller.poll_once()) == [f"reg.io/app:v1@{DIGEST_B}"]
    assert await poller.poll_once() == []
    assert len(warnings(caplog)) == 1

    # Back, unchanged: not offered twice; moved: offered.
    fake.failing = set()
    assert await poller.poll_once() == []
    fake.digests["v2"] = str(DIGEST_B)
    assert refs_of(await poller.poll_once()) == [f"reg.io/app:v2@{DIGEST_B}"]


async def test_a_removed_tag_is_forgotten_and_a_bad_digest_skipped() -> None:
    fake = FakeUpstream(["v1"], {"v1": str(DIGEST_A)})
    poller = Poller([Follow("reg.io/app:v*", poll=30.0)], fake, RecordingSink(), may_poll=Claim())
    assert len(await poller.poll_once()) == 1
    fake.tags = []
    assert await poller.poll_once() == []
    fake.tags = ["v1", "v2"]
    fake.digests["v2"] = "md5:nope"
    assert refs_of(await poller.poll_once()) == [f"reg.io/app:v1@{DIGEST_A}"]


async def test_a_failing_sink_does_not_stop_the_poller(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    class BrokenSink:
        def pushed(self, event: PushEvent) -> None:
            raise RuntimeError("the distributor is broken")

    fake = FakeUpstream(["v1"], {"v1": str(DIGEST_A)})
    poller = Poller([Follow("reg.io/app:v*", poll=30.0)], fake, BrokenSink(), may_poll=Claim())
    assert len(await poller.poll_once()) == 1
    assert "the push sink failed to take reg.io/app:v1" in caplog.text


async def test_too_many_matching_tags_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tags = [f"v{i}" for i in range(10)]
    fake = FakeUpstream(tags, dict.fromkeys(tags, str(DIGEST_A)))
    follow = Follow("reg.io/app:v*", poll=30.0)
    poller = Poller([follow], fake, RecordingSink(), may_poll=Claim(), max_tags=3)
    assert refs_of(await poller.poll_once()) == [f"reg.io/app:{t}@{DIGEST_A}" for t in tags[:3]]
    assert warnings(caplog) == [
        "polling reg.io/app:v*: 10 tags match; only the first 3 are polled "
        "(retried every interval; logged once)"
    ]
