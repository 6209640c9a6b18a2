"""Docker as a prefetch target: dockerd pulls the plan through this node's own mirror.

Docker's classic store (overlay2, vfs: every Docker before 24 and most hosts since) has no
API to put content in: it takes images by ``docker pull`` or by ``docker load`` only, and
``load`` wants a ``docker save`` tarball and leaves no trace of where the image came from.
A pull, on the other hand, checks every digest against the manifest, unpacks the layers and
works the same on the containerd image store. And by the time a runtime is asked to take a
plan, the prefetcher has made sure that this node's mirror holds or can fetch every blob of
it, so a pull through that mirror costs a loopback copy, not an upstream fetch. That is why
``take`` ignores its ``BlobReader``: dockerd reads the blobs itself, from the mirror's
registry port (``pull_via``), and no byte passes through this module.

The pull names the content where the prefetcher found it, in the mirror's path-prefix form
(``registry/paths.py``), by digest::

    <pull_via>/<fetched.registry>/<fetched.repository>@<target.digest>

then tags the image with the name the plan expects and removes the ``pull_via`` reference,
so ``docker images`` lists the image under the expected name only.

``pull_via`` is the ``host:port`` of this node's mirror registry port as dockerd reaches it,
a loopback address such as ``127.0.0.1:5000``. dockerd treats ``127.0.0.0/8`` as an insecure
registry range by default: it tries TLS, then falls back to plain HTTP, so the mirror's plain
HTTP port needs no configuration. Any other address must be listed in dockerd's
``insecure-registries``, or the mirror must serve TLS with a certificate dockerd trusts
(``/etc/docker/certs.d/<host:port>/ca.crt``). Otherwise dockerd speaks only HTTPS to it and
every pull fails (``http: server gave HTTP response to HTTPS client``, or a certificate error),
reported as a `RuntimeImportError`.
dockerd's ``registry-mirrors`` plays no part: it applies to ``docker.io`` only, and the
reference above names the mirror explicitly.

Two limits come from Docker's reference grammar, not from mirror:

- A path component cannot hold a ``:``, so a fetched registry with a port
  (``registry.internal:5000``) is named ``registry.internal_5000`` in the path-prefix form,
  which the mirror reads back (an underscore is in no host name and no Docker Hub
  namespace). Capitals and IPv6 addresses cannot be spelled at all: ``take`` refuses such a
  plan with a `RuntimeImportError` before dockerd is asked. The *expected* name may have
  anything: it is a tag, not a path component.
- Docker records a ``name@digest`` reference only for a name it pulled by; the tag API refuses
  digests. A digest-only ``plan.name`` is therefore tagged ``<registry>/<repository>:pinned-<12
  hex digits of the target digest>`` (`docker_name`): the image stays listed under its
  repository and is never dangling (so ``docker image prune`` keeps it). On the containerd
  image store ``docker run <repository>@<digest>`` should then find it (moby resolves a
  digest reference to any image of that repository with that target digest; Docker 20.10 here
  cannot test it); the classic store only resolves ``name@digest`` references it pulled
  itself, so there a workload naming the image by digest still asks the registry for the
  manifest.

The Docker SDK is synchronous: every call runs in a worker thread (`asyncio.to_thread`), with
a client of its own that is closed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import docker
import docker.errors
import requests.exceptions

from mirror.errors import ConfigError, NameInvalid, RuntimeImportError
from mirror.oci.reference import (
    registry_as_path_component,
    validate_registry,
    validate_repository,
)
from mirror.prefetch.model import BlobReader, ImagePlan, ImageRef

# A read of the daemon's answer that takes longer than this fails (inspect, tag, untag). The
# pull itself has no such limit: the SDK streams it without a timeout, and dockerd applies its
# own to the registry connection.
DEFAULT_TIMEOUT = 60.0
# The tag a digest-only expected name gets: `pinned-` and the start of the target digest, as
# long as Docker's short image ids.
PINNED_TAG_PREFIX = "pinned-"
_PINNED_HEX_DIGITS = 12
# Docker's limit on a whole name, registry included (distribution/reference).
_MAX_NAME_LENGTH = 255

# What the SDK and the HTTP stack under it raise when the daemon cannot be reached or answers
# with an error; each becomes a one-line `RuntimeImportError`.
_DAEMON_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class DockerRuntime:
    """A node's Docker Engine, fed by pulls through the node's own mirror.

    ``docker_host`` is a Docker host URL (``unix:///run/docker.sock``), as mirror.cli resolves
    it for ``--store=docker``; ``pull_via`` is ``host:port`` of this node's mirror registry
    port as dockerd reaches it (see the module docstring for why loopback). Nothing here reads
    the environment.
    """

    def __init__(
        self, docker_host: str, pull_via: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        try:
            validate_registry(pull_via)
            if ":" not in pull_via.rpartition("]")[2]:
                raise NameInvalid(f"{pull_via!r} has no port")
        except NameInvalid:
            raise ConfigError(
                f"pull via {pull_via!r}: not the host:port of a registry (no scheme, no path)"
            ) from None
        self._docker_host = docker_host
        self._pull_via = pull_via
        self._timeout = timeout

    @property
    def name(self) -> str:
        return "docker"

    def pull_reference(self, plan: ImagePlan) -> str:
        """``<pull_via>/<registry>/<repository>@<digest>``: what dockerd pulls the plan by.

        A port is spelled ``_PORT`` (``registry.internal_5000``), which the mirror reads back
        (`registry_as_path_component`). `RuntimeImportError` when Docker's grammar cannot
        express the registry (capitals, IPv6) or the mirror would read it as a Docker Hub
        namespace (a single word without a port, other than ``localhost``).
        """
        fetched = plan.fetched
        component = registry_as_path_component(fetched.registry)
        if component is None:
            raise RuntimeImportError(
                f"{fetched.name} cannot be pulled through the mirror at {self._pull_via}: "
                f"Docker cannot name the registry {fetched.registry!r} in a path (capitals, "
                "IPv6, or a single-word host it would read as a Docker Hub namespace)"
            )
        path = f"{component}/{fetched.repository}"
        reference = f"{self._pull_via}/{path}"
        try:
            validate_repository(path)
        except NameInvalid as exc:
            raise RuntimeImportError(
                f"{fetched.name} cannot be pulled through the mirror at {self._pull_via}: "
                f"{exc} for Docker"
            ) from None
        if len(reference) > _MAX_NAME_LENGTH:
            raise RuntimeImportError(
                f"{reference} is longer than Docker's {_MAX_NAME_LENGTH} characters"
            )
        return f"{reference}@{plan.target.digest}"

    async def holds(self, plan: ImagePlan) -> bool:
        """`docker_name(plan.name)` exists and is the plan's image.

        Only the image ID is compared, and it means the right thing on both stores: on the
        classic store it is the config digest (``plan.config``), and every image there is
        unpacked; on the containerd image store it is the digest the name points to
        (``plan.target``, the index or manifest). ``RepoDigests`` adds nothing: on the
        containerd store it is derived from that same target, and on the classic store it lists
        only names the image was pulled by, which `take` removes again.

        On the containerd store an image can be present but not unpacked for this platform;
        ``docker image inspect`` does not tell, so that case counts as held.

        `RuntimeImportError` when the daemon cannot be asked: "not held" would be a guess.
        """
        name = docker_name(plan.name)
        try:
            attrs = await asyncio.to_thread(self._inspect, name)
        except _DAEMON_ERRORS as exc:
            raise RuntimeImportError(
                f"Docker daemon at {self._docker_host}: inspect {name}: {readable(exc)}"
            ) from exc
        if attrs is None:
            return False
        return attrs.get("Id") in {str(plan.config.digest), str(plan.target.digest)}

    async def take(self, plan: ImagePlan, blobs: BlobReader) -> None:
        """Pull the plan through the node's mirror, tag it `docker_name(plan.name)`, drop the
        pull's own reference.

        ``blobs`` is not read: dockerd fetches the blobs from the mirror itself (see the
        module docstring). `RuntimeImportError` with a one-line reason when the pull reference
        cannot be formed, dockerd cannot be reached, the pull fails (dockerd's own message,
        such as ``manifest unknown``), or dockerd ends up with an image other than the plan's
        (a platform the prefetcher did not resolve for).
        """
        del blobs  # dockerd reads every blob from the mirror; see the module docstring
        reference = self.pull_reference(plan)
        await asyncio.to_thread(self._take, plan, reference)

    def _client(self) -> docker.APIClient:
        # version="auto" negotiates the API version: a pinned old one is refused by new
        # daemons (Docker 29 accepts 1.44 and later only), a new one by old daemons.
        return docker.APIClient(base_url=self._docker_host, version="auto", timeout=self._timeout)

    def _inspect(self, name: str) -> dict[str, Any] | None:
        """``docker image inspect NAME``, None when there is no such image (worker thread)."""
        client = self._client()
        try:
            attrs: dict[str, Any] = client.inspect_image(name)
            return attrs
        except docker.errors.ImageNotFound:
            return None
        finally:
            client.close()

    def _take(self, plan: ImagePlan, reference: str) -> None:
        """Pull, check, tag, untag (worker thread)."""
        repository, tag = _docker_tag(plan.name)
        try:
            client = self._client()
        except _DAEMON_ERRORS as exc:
            raise RuntimeImportError(
                f"Docker daemon at {self._docker_host}: {readable(exc)}"
            ) from exc
        try:
            try:
                _pull(client, reference)
            except _DAEMON_ERRORS as exc:
                raise RuntimeImportError(f"docker pull {reference}: {readable(exc)}") from exc
            try:
                image_id = str(client.inspect_image(reference).get("Id", ""))
                wanted = {str(plan.config.digest), str(plan.target.digest)}
                if image_id not in wanted:
                    raise RuntimeImportError(
                        f"docker pull {reference} gave image {image_id}, not the plan's "
                        f"{plan.config.digest}: dockerd chose another platform"
                    )
                if not client.tag(image_id, repository, tag):
                    raise RuntimeImportError(f"docker tag {image_id} {repository}:{tag} refused")
                # The expected name now holds the image, so removing the pull's reference
                # only untags: dockerd deletes an image with its last reference alone. A
                # concurrent take of the same content may have removed it first.
                with contextlib.suppress(docker.errors.ImageNotFound):
                    client.remove_image(reference, noprune=True)
            except _DAEMON_ERRORS as exc:
                raise RuntimeImportError(
                    f"Docker daemon at {self._docker_host}: naming {reference} "
                    f"{repository}:{tag}: {readable(exc)}"
                ) from exc
        finally:
            client.close()


def docker_name(name: ImageRef) -> str:
    """The tag reference the plan's expected ``name`` gets in Docker (see `take`).

    ``docker.io/library/traefik:v2.10`` stays as it is: dockerd normalises it and lists it as
    ``traefik:v2.10``, which ``docker run traefik:v2.10`` finds. A name with a tag and a digest
    keeps the tag; a digest-only name gets the ``pinned-`` tag (module docstring).
    """
    repository, tag = _docker_tag(name)
    return f"{repository}:{tag}"


def _docker_tag(name: ImageRef) -> tuple[str, str]:
    if name.tag:
        return name.name, name.tag
    assert name.digest is not None  # ImageRef holds a tag, a digest, or both
    return name.name, PINNED_TAG_PREFIX + name.digest.hex[:_PINNED_HEX_DIGITS]


def _pull(client: docker.APIClient, reference: str) -> None:
    """Pull ``reference`` and read dockerd's progress stream to its end.

    dockerd answers an error found before it starts writing (an unknown manifest, a refused
    connection) with an HTTP error status, and one found later (a blob that fails halfway)
    as an ``error`` message inside the 200 stream: both are raised. The empty credentials keep
    the SDK from looking up a Docker config's for the mirror, which takes none.
    """
    messages: Iterable[Mapping[str, Any]] = client.pull(
        reference, stream=True, decode=True, auth_config={}
    )
    for message in messages:
        error = message.get("error")
        if error:
            detail = message.get("errorDetail") or {}
            raise RuntimeImportError(
                f"docker pull {reference}: {_one_line(str(detail.get('message') or error))}"
            )


def readable(exc: BaseException) -> str:
    """One line a person can act on, from an SDK or transport error.

    An ``APIError``'s own ``str`` starts with the request URL (``500 Server Error for
    http+docker://localhost/v1.41/images/create?...``); dockerd's message is its
    ``explanation``, and that is all that is kept.
    """
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return _one_line(str(exc.explanation))
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())
