"""Reaching the Hugging Face hub: one quick probe instead of huggingface_hub's retry loop, and
fetching a dictionary directory from it (`hub_snapshot`, data files only).

With no network, huggingface_hub retries each request five times with backoff (1+2+4+8+8 s) and
logs two warning lines per try, so a hub spec took about 30 s and 13 lines to fail. Before a hub
load, saelab opens one TCP connection to the hub endpoint (HF_ENDPOINT, or the proxy that would
carry the request) within PROBE_SECONDS, name resolution included. When that fails, or when
HF_HUB_OFFLINE is set, loads read only the local cache and fail at once when it lacks the files.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from saelab.errors import SaelabError

PROBE_SECONDS = 3.0


def endpoint() -> str:
    """The hub's base URL, as huggingface_hub reads it (HF_ENDPOINT honoured)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _probe_address(url: str) -> tuple[str, int]:
    """(host, port) a request to `url` first connects to: its proxy when one applies."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, port


def _connect_error(host: str, port: int) -> str | None:
    """Why no TCP connection to host:port opened within PROBE_SECONDS, or None if one did.

    Runs in a daemon thread because a stalled name lookup ignores socket timeouts."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(str(e) or type(e).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    return outcome[0] if outcome else f"no connection within {PROBE_SECONDS:g} s"


def offline_mode() -> bool:
    """Whether HF_HUB_OFFLINE is set (as huggingface_hub reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable() -> str | None:
    """None when the hub can be asked; else why not (HF_HUB_OFFLINE, or the failed probe), for
    an error message. Probed on every call: a network that comes back is used again."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    host, port = _probe_address(endpoint())
    error = _connect_error(host, port)
    return None if error is None else f"the hub {endpoint()} is unreachable ({error})"


def hub_snapshot(spec: str) -> Path:
    """Fetch `owner/name[/folder]` from the Hugging Face hub, only the dictionary files (data,
    never code); from the local cache alone when the hub is unreachable (`unreachable`)."""
    from huggingface_hub import snapshot_download

    from saelab.formats.saelens import SAELENS_WEIGHTS_FILE
    from saelab.sae import CONFIG_FILE, WEIGHTS_FILE

    parts = spec.split("/")
    repo_id, folder = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{folder}/" if folder else ""
    offline = unreachable()
    try:
        root = snapshot_download(repo_id, local_files_only=offline is not None, allow_patterns=[
            prefix + name for name in (CONFIG_FILE, WEIGHTS_FILE, SAELENS_WEIGHTS_FILE)])
    except Exception as e:  # offline, unknown or gated repo, proxy: all end the same way for the user
        why = f"{offline}, and it is not in the local cache" if offline else type(e).__name__
        raise SaelabError(
            f"no local directory {spec!r} and could not download it from the Hugging Face hub "
            f"({why}); pass a local dictionary directory"
        ) from None
    return Path(root) / folder
