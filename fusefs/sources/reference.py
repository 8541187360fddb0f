"""Image references and blob digests as the registry source needs them: host, repository, digest.

Both come from labels and are untrusted: they are validated against the distribution grammar
before they become part of a URL, so a reference can never smuggle a path or a query into one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fusefs.errors import SourceError

__all__ = ["DOCKER_HUB", "ImageRef", "parse_reference", "validate_digest"]

DOCKER_HUB = "docker.io"
# Where docker.io's API really lives.
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?$")
_IPV6_HOST = re.compile(r"^\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}
_MAX_REF = 4096


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference.

    Attributes:
        host: the registry as named in the reference (``docker.io`` for Docker Hub), with port.
        repository: the repository path (``library/`` added for official Docker Hub images).
        tag: the tag, if any.
        digest: the manifest digest, if the reference pins one.
    """

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host to contact when no mirror configuration says otherwise."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``<algorithm>:<lowercase hex>`` of a known algorithm.

    Raises:
        SourceError: anything else (wrong algorithm, length or characters).
    """
    algo, sep, hexpart = digest.partition(":")
    want = _DIGEST_HEX.get(algo)
    if not sep or want is None or len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise SourceError(f"invalid blob digest {digest[:100]!r}")
    return digest


def _is_host(component: str) -> bool:
    return ("." in component or ":" in component or component == "localhost"
            or component != component.lower())


def parse_reference(ref: str) -> ImageRef:
    """Parse ``[host[:port]/]repo[:tag][@digest]`` with Docker Hub normalisation.

    Raises:
        SourceError: the reference is empty, too long or does not follow the grammar.
    """
    if not ref or len(ref) > _MAX_REF:
        raise SourceError("image reference is empty or too long")
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        validate_digest(digest)
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise SourceError(f"invalid tag in image reference {ref[:200]!r}")
    first, sep, remainder = rest.partition("/")
    if sep and _is_host(first):
        host, repository = first, remainder
        if not (_HOSTNAME.match(host) or _IPV6_HOST.match(host)):
            raise SourceError(f"invalid registry host in image reference {ref[:200]!r}")
    else:
        host, repository = DOCKER_HUB, rest
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(repository) > 255 or not _REPOSITORY.match(repository):
        raise SourceError(f"invalid repository in image reference {ref[:200]!r}")
    return ImageRef(host=host, repository=repository, tag=tag, digest=digest)
