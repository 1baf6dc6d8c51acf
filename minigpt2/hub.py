"""A name or a path -> local files: the one place minigpt2 asks the Hugging Face Hub for anything.

Every loader (weights, config, tokenizer, a generation config, an assistant model) takes
``name_or_path``. The rule that decides between the two, the offline switch, the quick
reachability check and the downloads live here, so each loader only says which files it
wants and what to do when the repo lacks one:

* an existing directory is used as it is (:func:`local_dir`);
* a name that looks like a path but does not exist is a ``FileNotFoundError``;
* anything else is a Hub repo id (``gpt2``, ``owner/name``), read through
  ``huggingface_hub`` into the standard cache (:class:`HubRepo`). With ``HF_HUB_OFFLINE=1``,
  or when the Hub does not accept a connection within two seconds, only the cache is read.

:func:`atomic_write` is the other half of "files": every file minigpt2 writes goes through it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HubRepo", "NotADirectory", "atomic_write", "hub_offline", "hub_reachable", "local_dir", "looks_like_path"]


def looks_like_path(name: str) -> bool:
    """True if ``name`` is meant as a filesystem path rather than a Hub repo id (a repo id
    is ``name`` or ``owner/name``)."""
    return (
        os.path.exists(name)
        or name.startswith(("/", "./", "../", "~", "\\", ".\\", "..\\"))
        or os.path.isabs(name)
        or name in (".", "..")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


class NotADirectory(FileNotFoundError, ValueError):
    """A file where a directory was asked for: both a bad value and a directory not found."""


def local_dir(name_or_path: str | os.PathLike[str], what: str = "checkpoint") -> Path | None:
    """The directory ``name_or_path`` names, or None when it is a Hub repo id.

    Raises:
        FileNotFoundError: it looks like a path (see :func:`looks_like_path`), or is an
            ``os.PathLike``, and no such directory exists ("{what} directory not found: ...").
        NotADirectory: it names a file, not a directory (a FileNotFoundError and a ValueError).
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():  # e.g. the path of model.safetensors itself
        raise NotADirectory(f"{name} is a file, not a {what} directory: pass the directory that holds it")
    if isinstance(name_or_path, os.PathLike) or looks_like_path(name):
        raise FileNotFoundError(f"{what} directory not found: {name}")
    return None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the local cache only (huggingface_hub's spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Cheap check that the Hub endpoint accepts TCP connections.

    ``huggingface_hub`` retries failed connections with back-off (about 25 s
    and a page of warnings when offline); one short connect avoids that.
    With a proxy configured the check is skipped (the proxy decides).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlsplit(endpoint)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class HubRepo:
    """Files of one Hub repo at one revision, through the standard Hugging Face cache.

    Whether to go online is decided once per object, on first use: not with
    ``HF_HUB_OFFLINE`` set, nor when the Hub does not answer :func:`hub_reachable`; then
    only the cache is read, so a cached repo still loads and an uncached one fails at
    once instead of after minutes of retries.
    """

    def __init__(
        self, repo_id: str, revision: str | None = None, *, local_only: bool | None = None, what: str = "checkpoint"
    ) -> None:
        """``local_only``: read only the cache (None: decide on first use, see above).
        ``what``: how errors name the thing asked for ("could not get {what} 'gpt2' ...")."""
        self.repo_id, self.revision, self.what = repo_id, revision, what
        self._local_only = local_only
        #: Set when a file was missing only because the cache lacks it (offline / unreachable).
        self.not_cached = False

    @property
    def local_only(self) -> bool:
        if self._local_only is None:
            self._local_only = hub_offline() or not hub_reachable()
        return self._local_only

    def file(self, filename: str) -> Path | None:
        """Local path of ``filename``, downloaded when needed; None when the repo has no such
        file, or (offline) the cache does not hold it (then :attr:`not_cached` is set).

        Raises:
            ValueError: naming the repo, for anything else huggingface_hub raises (network
                errors, an unknown or private repo, a malformed repo id).
        """
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            raise ValueError(f"{self.repo_id!r} is not a local directory and huggingface_hub is not installed") from None
        try:
            return Path(
                hf_hub_download(self.repo_id, filename, revision=self.revision, local_files_only=self.local_only)
            )
        except LocalEntryNotFoundError:  # (a subclass: test it first) not cached, no Hub
            self.not_cached = True
            return None
        except EntryNotFoundError:  # the repo has no such file
            return None
        except Exception as e:  # network errors, 401/404, bad repo id, ...
            raise self.error(e) from None

    def error(self, e: Exception | None = None) -> ValueError:
        """One ValueError that names the repo and says what to do; ``e`` None means "not in the
        cache" when :attr:`not_cached` is set."""
        if e is None and self.not_cached:
            reason = (
                "it is not in the local Hugging Face cache and the Hub cannot be reached"
                + (" (HF_HUB_OFFLINE is set)" if hub_offline() else "")
                + "; download it once while online, or pass a local directory"
            )
        else:
            text = str(e).strip() if e is not None else ""
            reason = text.splitlines()[0] if text else (type(e).__name__ if e is not None else "not found")
        return ValueError(
            f"could not get {self.what} {self.repo_id!r} from the Hugging Face Hub (and no such local directory): {reason}"
        )


def read_json(path: str | os.PathLike[str], kind: type = dict, what: str = "file") -> Any:
    """The JSON value of a file that must hold a ``kind`` (``dict`` for an object, ``list``
    for an array): configs, tokenizer files, indexes.

    Raises FileNotFoundError ("{what} not found: path") when the file is missing, and
    ValueError naming the file when it is not UTF-8 JSON or holds another kind of value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}, got {type(value).__name__}")
    return value


def atomic_write(path: str | os.PathLike[str], data: str | bytes | Callable[[str], object]) -> None:
    """Write ``path`` under a temporary name in its directory, then rename it into place, so a
    half-written file never looks complete.

    ``data`` is the text (UTF-8, "\\n" line ends), the bytes, or a function that writes the
    file at the temporary path it is given (``safetensors.torch.save_file`` and the like).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
