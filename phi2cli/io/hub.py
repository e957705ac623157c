"""Hub access in seconds: probe the Hugging Face hub once, and name everything missing from the cache at once.

Without this, an unreachable hub costs a minute of retries per item and reports only the first one.
Imports no torch; huggingface_hub (and datasets, when already loaded) are touched only to switch
them to offline mode.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from phi2cli.config import Phi2Config
from phi2cli.data.sources import uses_local_files
from phi2cli.errors import HubUnreachableError

PROBE_TIMEOUT_S = 3.0  # one request; a reachable hub answers in well under a second
_TRUE = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class HubItem:
    """Something a command would download from the hub, and the local alternative to it."""

    kind: str  # "model", "tokenizer" or "dataset"
    name: str  # hub id
    instead: str  # what to pass instead when it cannot be downloaded


def is_hub_id(name: str | None) -> bool:
    """'owner/name' or 'name' that is not a local path (paths that do not exist are reported elsewhere)."""
    if not name or Path(name).expanduser().exists():
        return False
    return not name.startswith((".", "/", "~")) and not name.lower().endswith(".gguf") and name.count("/") <= 1


def hub_items(config: Phi2Config, *, model: bool = True, tokenizer: bool = True, data: bool = False) -> list[HubItem]:
    """What `config` takes from the hub: the model, the tokenizer, the dataset (when asked for)."""
    items = []
    if model and is_hub_id(config.model.model):
        items.append(HubItem("model", config.model.model, "--model DIR|FILE.gguf"))
    name = config.model.tokenizer or config.model.model
    if tokenizer and is_hub_id(name):
        instead = "--tokenizer DIR" if config.model.tokenizer else "--model DIR|FILE.gguf, or --tokenizer DIR"
        items.append(HubItem("tokenizer", name, instead))
    if data and not uses_local_files(config.data) and is_hub_id(config.data.dataset):
        items.append(HubItem("dataset", config.data.dataset, "--data-dir DIR with train.jsonl and validation.jsonl"))
    return items


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_probed: dict[str, bool] = {}  # endpoint -> reachable, once per process


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint; any HTTP answer counts. Bounded by `timeout`, DNS included."""
    endpoint = _endpoint()
    if endpoint in _probed:
        return _probed[endpoint]
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:  # the hub answered (4xx/5xx): it is reachable
            answer.append(True)
        except Exception:  # refused, no route, DNS failure, timeout, bad proxy
            answer.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)  # a hanging DNS lookup is not covered by the socket timeout
    _probed[endpoint] = bool(answer and answer[0])
    return _probed[endpoint]


def go_offline() -> None:
    """Switch huggingface_hub, transformers and datasets to their offline mode for this process."""
    from phi2cli.compat import switch_hub_offline

    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries not imported yet
    switch_hub_offline()  # for those already imported


def cached(item: HubItem) -> bool:
    """Whether the hub cache (or datasets' own cache) already holds `item`, so offline mode can load it."""
    from huggingface_hub import try_to_load_from_cache

    if item.kind == "dataset":
        hub = os.environ.get("HF_HUB_CACHE") or str(Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        built = os.environ.get("HF_DATASETS_CACHE") or str(
            Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "datasets")  # fmt: skip
        repo = Path(hub).expanduser() / ("datasets--" + item.name.replace("/", "--"))
        arrow = Path(built).expanduser() / item.name.replace("/", "___")
        return (repo / "snapshots").is_dir() or arrow.is_dir()
    files = ("config.json",) if item.kind == "model" else ("tokenizer_config.json", "tokenizer.json")
    return any(isinstance(try_to_load_from_cache(item.name, f), str) for f in files)


def check_hub_access(config: Phi2Config, *, model: bool = True, tokenizer: bool = True,
                     data: bool = False) -> list[str]:  # fmt: skip
    """Before anything slow: is what `config` needs from the hub reachable or cached?

    With no hub (HF_HUB_OFFLINE unset), finds out in seconds and switches to offline mode, so the
    libraries load from the cache without retrying.

    Returns:
        notes for the user (that the command works offline from the cache).
    Raises:
        HubUnreachableError naming every missing item and the local alternative to each.
    """
    items = hub_items(config, model=model, tokenizer=tokenizer, data=data)
    if not items:
        return []
    requested = offline_requested()
    if not requested:
        if hub_reachable():
            return []
        go_offline()
    missing = [item for item in items if not cached(item)]
    why = "HF_HUB_OFFLINE is set" if requested else f"the Hugging Face hub is unreachable ({_endpoint()})"
    if missing:
        listed = "; ".join(f"{item.kind} '{item.name}' (use {item.instead})" for item in missing)
        raise HubUnreachableError(f"{why} and the local cache lacks: {listed}")
    return [] if requested else [f"{why}: working offline from the local cache"]


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
