"""The token cache: a store per (data, tokenizer, rendering), built once, found again by its key.

The key is the BLAKE2b of

- the data's fingerprint: for every file, its path, size, modification time and content hash
  (``usp.inputs.fingerprint``, the same record a run keeps of its inputs), or the standard
  library's fingerprint for the default data;
- the tokenizer's identity (class, size, EOS, the SHA-256 of its serialisation, and of the chat
  template for conversations; or byte-level);
- the rendering: text or chat, the field, which tokens carry the loss, and a version of this
  code's encoding.

So a second run over the same data opens the store without tokenizing; data or a tokenizer that
changed gives another key (a new store), never the old tokens. A store is built in a temporary
folder beside its final name and renamed into place when complete, under an exclusive lock per
key (``flock``), so ranks or runs preparing the same data wait for one build instead of racing.
A store that fails its checks (``usp.data.store.TokenStore.open``) is moved aside and rebuilt,
with a warning that says why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from usp.data.encode import load_tokenizer, tokenizer_identity
from usp.data.sources import STDLIB, Source, data_fingerprint, find_sources
from usp.data.spec import DataSpec, check_spec
from usp.data.store import CorruptStore, TokenStore

logger = logging.getLogger(__name__)

# raise when what a given (data, tokenizer, rendering) becomes changes: old stores then miss
ENCODING_VERSION = 1
BUILD_RECORD = ("seconds", "tokens_per_s", "processes", "finished")


@dataclass
class Prepared:
    """A run's tokens: the open store and what its log says of them."""

    store: TokenStore
    cache_hit: bool  # the store was there before this preparation began
    built_alongside: bool  # another process built it while this one waited (ranks of a run)
    documents: int
    tokens: int
    loss_tokens: int
    skipped: int
    seconds: float  # tokenizing, in the build that made the store
    tokens_per_s: float
    processes: int
    render: dict  # how records became tokens (spec.render(), and the chat template's SHA-256)

    def summary(self) -> str:
        """One line for the log: counts, throughput and whether the cache was hit."""
        tokenized = (f"{self.seconds:.1f} s, {self.tokens_per_s:,.0f} tokens/s with "
                     f"{self.processes} process{'es' if self.processes > 1 else ''}")
        if self.cache_hit:
            how = (f"cache hit, {self.store.name} (tokenized earlier at {self.tokens_per_s:,.0f} "
                   "tokens/s)")
        elif self.built_alongside:
            how = (f"tokenized just now by another process while this one waited ({tokenized}), "
                   f"cached in {self.store.name}")
        else:
            how = f"tokenized in {tokenized}, cached in {self.store.name}"
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.loss_tokens:,} "
                f"loss tokens, {self.skipped:,} skipped; {how}")


def _sources(spec: DataSpec) -> list[Source]:
    return find_sources(spec.paths) if spec.paths else [STDLIB]


def cache_key(spec: DataSpec, tokenizer) -> tuple[str, dict]:
    """``(key, what it is made of)``: see the module docstring."""
    render = spec.render()
    material = {"encoding_version": ENCODING_VERSION,
                "data": data_fingerprint(list(spec.paths), synthetic=False),
                "tokenizer": tokenizer_identity(tokenizer, spec), "render": render}
    canonical = json.dumps(material, sort_keys=True).encode()
    return hashlib.blake2b(canonical, digest_size=16).hexdigest(), material


class _KeyLock:
    """An exclusive ``flock`` on ``CACHE/KEY.lock`` while a store is looked up or built:
    :meth:`acquire` takes it (OSError where the folder is not writable), leaving the ``with``
    block releases it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> "_KeyLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it however the process ends
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __enter__(self) -> "_KeyLock":
        # a second flock on another descriptor of the same file would wait for this one forever
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the lock
        self.fd = None


def _open_existing(directory: Path, key: str) -> TokenStore | None:
    """The store at ``directory`` if there is one and it passes its checks; a corrupt one is
    moved aside (and removed) with a warning, and None returned so it is rebuilt."""
    if not directory.exists():
        return None
    try:
        store = TokenStore.open(directory)
        manifest, build = store.manifest, store.manifest.get("build")
        if manifest.get("key") != key:
            raise CorruptStore(f"{directory}/manifest.json records another key "
                               f"({manifest.get('key')!r})")
        if not (isinstance(manifest.get("skipped"), int) and isinstance(build, dict) and all(
                isinstance(build.get(name), (int, float)) for name in BUILD_RECORD)):
            raise CorruptStore(f"{directory}/manifest.json has no build record "
                               f"({', '.join(BUILD_RECORD)}) or skipped count")
        return store
    except (CorruptStore, OSError) as exc:
        logger.warning("token cache %s is damaged and is rebuilt: %s", directory, exc)
        stale = directory.with_name(f".stale-{directory.name}-{uuid.uuid4().hex[:8]}")
        os.rename(directory, stale)
        shutil.rmtree(stale, ignore_errors=True)
        return None


def _prepared(store: TokenStore, render: dict, cache_hit: bool,
              built_alongside: bool = False) -> Prepared:
    manifest, build = store.manifest, store.manifest["build"]
    return Prepared(store=store, render=render, cache_hit=cache_hit,
                    built_alongside=built_alongside,
                    documents=manifest["documents"],
                    tokens=manifest["tokens"], loss_tokens=manifest["loss_tokens"],
                    skipped=manifest["skipped"], seconds=build["seconds"],
                    tokens_per_s=build["tokens_per_s"], processes=build["processes"])


def prepare(spec: DataSpec) -> Prepared:
    """The run's tokens from the cache, tokenizing them first when no intact store has their key.

    ValueError, naming the file and line or record, for bad settings or data (nothing is left
    in the cache then).
    """
    from usp.data.prepare import tokenize_into

    check_spec(spec)
    sources = _sources(spec)
    tokenizer = load_tokenizer(spec)
    key, material = cache_key(spec, tokenizer)
    render = dict(spec.render())
    if "chat_template_sha256" in material["tokenizer"]:  # a resume must render the same way
        render["chat_template_sha256"] = material["tokenizer"]["chat_template_sha256"]
    cache = spec.cache_dir
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--data-cache {str(cache)!r} cannot be created: {exc}") from exc
    directory, started = cache / key, time.time()
    try:
        lock = _KeyLock(cache / f"{key}.lock").acquire()
    except OSError as exc:
        raise ValueError(f"--data-cache {str(cache)!r} is not writable: {exc}") from exc
    with lock:
        store = _open_existing(directory, key)
        if store is not None:  # built before this call began, or while it waited for the lock
            alongside = store.manifest["build"]["finished"] >= started
            return _prepared(store, render, cache_hit=not alongside, built_alongside=alongside)
        building = cache / f".building-{key}-{uuid.uuid4().hex[:8]}"
        tokenize_into(building, spec, sources, tokenizer, {"key": key, "key_material": material})
        os.rename(building, directory)  # complete or absent: a reader never sees half a store
        return _prepared(TokenStore.open(directory), render, cache_hit=False)
