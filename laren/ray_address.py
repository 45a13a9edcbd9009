"""One meaning for ``RAY_ADDRESS`` and ``--address``, as Ray has it: a Ray cluster is named by any of

    http(s)://host:8265     its dashboard: the Jobs API (`laren submit`, `sweep`, `status`, `logs`, `stop`, `list`)
    host:6379  (or auto)    its GCS: what a driver connects to (`laren train`, `laren prior train`; ray.init)
    ray://host:10001        its Ray Client server: a remote driver

and every laren command accepts each form, converting to what it needs: a Jobs API command asks the GCS (or the Ray
Client server) for the dashboard's URL, as ``ray job submit`` does; a driver given a dashboard URL connects to the
local head's GCS when the URL is the local head's, and otherwise stops with an error saying which address to give
(the Jobs API cannot tell a GCS address).
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Mapping, Optional

from laren.config import ConfigError


def kind(address: str) -> str:
    """``dashboard`` (http/https URL), ``client`` (ray://) or ``gcs`` (host:port, auto)."""
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme in ("http", "https"):
        return "dashboard"
    if scheme == "ray":
        return "client"
    if scheme:
        raise ConfigError(f"Ray address {address!r}: unknown scheme {scheme}://; give the dashboard URL "
                          "(http://host:8265), the GCS address (host:6379) or a Ray Client address (ray://host:10001)")
    return "gcs"


def _same_endpoint(a: str, b: str) -> bool:
    def hp(x: str) -> tuple[str, Optional[int]]:
        u = urllib.parse.urlparse(x if "://" in x else f"x://{x}")
        host = {"localhost": "127.0.0.1", "::1": "127.0.0.1"}.get(u.hostname or "", u.hostname or "")
        return host, u.port
    return hp(a) == hp(b)


def jobs_api_url(address: str, local_head: Optional[Mapping[str, Any]] = None) -> str:
    """The dashboard URL (Ray Jobs API) of the cluster named by ``address`` (any form; see the module docstring).
    ``local_head``: the local services' Ray record (``address``, ``dashboard_url``), answered without asking Ray."""
    k = kind(address)
    if k == "dashboard":
        return address.rstrip("/")
    if local_head and local_head.get("address") and _same_endpoint(address, local_head["address"]):
        return local_head["dashboard_url"]
    from ray.dashboard.utils import ray_address_to_api_server_url, ray_client_address_to_api_server_url

    try:
        url = (ray_client_address_to_api_server_url if k == "client" else ray_address_to_api_server_url)(address)
    except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError, grpc errors
        hint = (f"; http://{address} would be a dashboard URL" if address.rstrip("/").endswith(":8265") else "")
        raise ConfigError(f"cannot find the Ray dashboard (Jobs API) of the cluster at {address}: "
                          f"{' '.join(str(err).split())[:300]}. Check --address / RAY_ADDRESS: the dashboard URL "
                          f"(http://host:8265), the GCS address (host:6379) or ray://host:10001{hint}") from None
    return url if "://" in url else f"http://{url}"


def driver_address(address: str, local_head: Optional[Mapping[str, Any]] = None) -> str:
    """What ``ray.init`` connects a driver to for the cluster named by ``address`` (any form): a GCS or Ray Client
    address as given; a dashboard URL mapped to the local head's GCS, else a ConfigError naming what to give."""
    if kind(address) != "dashboard":
        return address
    if local_head and local_head.get("address") and _same_endpoint(address, local_head.get("dashboard_url", "")):
        return local_head["address"]
    host = urllib.parse.urlparse(address).hostname or "<head>"
    raise ConfigError(
        f"RAY_ADDRESS / --address {address} is a dashboard URL (the Jobs API); a driver here needs the cluster's GCS "
        f"address ({host}:6379) or its Ray Client address (ray://{host}:10001). Or run the job on the cluster: "
        f"`laren submit JOB --address {address}`"
    )
