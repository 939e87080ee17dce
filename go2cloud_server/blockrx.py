"""HTTPS receiver of the block data path (docs/protocol.md, section "Block target").

Served by the control plane's HTTPS server (``httpapi``) under ``/block/v1/``; the agent pins
the same certificate. Every request carries the task's own bearer token, which ``resolve``
checks (the control plane's task table) and turns into the task's :class:`BlockTaskStore`.

Everything that can be refused is refused from the request line and headers, before a byte of
the body is read: :meth:`BlockReceiver.authenticate` (route, token; the server then closes the
connection without reading the body) and :meth:`BlockReceiver.admit` (the disk is one the task
declared, the disk size within its limit, a commit's body exactly the hashes of its chunks).

Routes (``{task}`` and ``{disk}`` are ``[A-Za-z0-9._-]{1,64}``, ``{index}`` a decimal chunk index):

* ``PUT  /block/v1/tasks/{task}/disks/{disk}/chunks/{index}`` one chunk (raw, zstd or hole)
* ``POST /block/v1/tasks/{task}/disks/{disk}/chunks``         a batch of framed chunks
* ``POST /block/v1/tasks/{task}/disks/{disk}/verify``         read-back check of chunk hashes
* ``POST /block/v1/tasks/{task}/disks/{disk}/commit``         end of a cycle for this disk
* ``GET  /block/v1/tasks/{task}/disks/{disk}``                what the target has committed
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from go2cloud_server.blockstore import (
    HASH_LEN,
    MAX_CHUNK,
    MAX_CHUNKS,
    BatchItem,
    BlockTaskStore,
    Buffer,
    check_geometry,
    chunk_len,
    decompress_chunk,
)
from go2cloud_server.errors import AuthFailed, InvalidInput, NotFound, ServerError, TooLarge

log = logging.getLogger(__name__)

PREFIX = "/block/v1/"
#: body caps: a chunk (raw or zstd; zstd adds a few bytes per 128 KiB block), a verify request
#: (up to 65536 records of 20 bytes), a commit (16 bytes per chunk of the largest disk), a batch
#: (MAX_BATCH_BODY)
MAX_CHUNK_BODY = MAX_CHUNK + 64 * 1024
VERIFY_RECORD = struct.Struct(">I16s")
MAX_VERIFY_RECORDS = 65536
MAX_COMMIT_BODY = MAX_CHUNKS * HASH_LEN
MAX_HOLE_RUN = 1 << 20
#: a batch: frames of ``FRAME`` (index, count, payload length, encoding, flags, xxh3-128), each
#: followed by a 32-byte BLAKE3 when ``flags & FLAG_BLAKE3``, then its payload
FRAME = struct.Struct(">IIIBB2x16s")
FLAG_BLAKE3 = 1
ENCODINGS = {0: "raw", 1: "zstd", 2: "hole"}
MAX_BATCH_BODY = 16 * 1024 * 1024
MAX_BATCH_FRAMES = 1024
MAX_BATCH_PLAIN = 64 * 1024 * 1024  # sum of the plain lengths of a batch's data chunks
#: request bodies of one task held in memory at once (an agent sends one batch of up to 8 MiB per
#: sender thread, one sender per core); a request over it waits for the task's others to finish,
#: at most BUSY_WAIT_S, then is answered 503 target_busy (the agent retries)
MAX_TASK_INFLIGHT = 256 * 1024 * 1024
BUSY_WAIT_S = 30.0
_NO_HASH = bytes(16)
_ID = r"([A-Za-z0-9._-]{1,64})"
_ROUTES = [
    ("PUT", re.compile(rf"^/block/v1/tasks/{_ID}/disks/{_ID}/chunks/([0-9]{{1,10}})$"), "chunk"),
    ("POST", re.compile(rf"^/block/v1/tasks/{_ID}/disks/{_ID}/chunks$"), "batch"),
    ("POST", re.compile(rf"^/block/v1/tasks/{_ID}/disks/{_ID}/verify$"), "verify"),
    ("POST", re.compile(rf"^/block/v1/tasks/{_ID}/disks/{_ID}/commit$"), "commit"),
    ("GET", re.compile(rf"^/block/v1/tasks/{_ID}/disks/{_ID}$"), "state"),
]
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

Resolver = Callable[[str, str], Optional[BlockTaskStore]]
Fence = Callable[..., None]
#: the session epoch every request carries (docs/protocol.md, "Fencing")
EPOCH_HEADER = "X-Go2cloud-Epoch"
_WRITES = ("chunk", "batch", "commit")


class BlockRequest(NamedTuple):
    """A request :meth:`BlockReceiver.authorize` accepted from its headers and path alone: the
    route, the task's store, the disk (one of the task's), and the largest body it may have."""

    route: str
    store: BlockTaskStore
    disk: str
    args: Tuple[str, ...]
    max_body: int


def _int_header(headers: Any, name: str, *, default: Optional[int] = None) -> int:
    raw = headers.get(name)
    if raw is None:
        if default is not None:
            return default
        raise InvalidInput(f"header {name} is missing")
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidInput(f"header {name}: {raw[:40]!r} is not a non-negative integer")
    return int(raw)


class TargetBusy(ServerError):
    http_status = 503
    code = "target_busy"
    summary = "the task has too many request bodies in flight; retry"


def _error(exc: ServerError) -> Tuple[int, dict]:
    return exc.http_status, {"error": {"code": exc.code, "message": exc.message}}


class BlockReceiver:
    """Routes ``/block/v1/...`` requests to the task's store. ``handle`` never raises for a
    client error: it answers with the protocol's error body."""

    routes = [(m, rx.pattern, name) for m, rx, name in _ROUTES]

    def __init__(self, resolve: Resolver, inflight_limit: int = MAX_TASK_INFLIGHT,
                 busy_wait_s: float = BUSY_WAIT_S, fence: Optional[Fence] = None) -> None:
        self.resolve = resolve
        #: the session fence (``Service.check_epoch``): (task, X-Go2cloud-Epoch, writes) -> None or
        #: raises StaleEpoch; checked with the token, before the body is read
        self.fence = fence
        self.inflight_limit = inflight_limit
        self.busy_wait_s = busy_wait_s
        self._inflight: Dict[str, int] = {}  # per task: body bytes reserved by requests being served
        self._inflight_cv = threading.Condition()

    def reserve(self, req: BlockRequest, length: int) -> None:
        """Count ``length`` body bytes against the task's in-flight limit before the body is
        read: wait (at most ``busy_wait_s``) while the task's other requests hold too much, then
        TargetBusy. A task's first request always fits. Pair with :meth:`release`."""
        task = req.args[0]
        with self._inflight_cv:
            fits = self._inflight_cv.wait_for(
                lambda: not self._inflight.get(task) or self._inflight[task] + length <= self.inflight_limit,
                self.busy_wait_s)
            if not fits:
                raise TargetBusy(f"task {task} has {self._inflight[task]} bytes of requests in flight (limit "
                                 f"{self.inflight_limit}): send fewer requests at once, or retry")
            self._inflight[task] = self._inflight.get(task, 0) + length

    def release(self, req: BlockRequest, length: int) -> None:
        task = req.args[0]
        with self._inflight_cv:
            left = self._inflight.get(task, 0) - length
            if left > 0:
                self._inflight[task] = left
            else:
                self._inflight.pop(task, None)
            self._inflight_cv.notify_all()

    @staticmethod
    def owns(path: str) -> bool:
        return path.startswith(PREFIX)

    @staticmethod
    def max_body(method: str, path: str) -> int:
        """Largest request body of a route, whatever the headers say (the caps of the protocol)."""
        if method == "PUT":
            return MAX_CHUNK_BODY
        if path.rstrip("/").endswith("/chunks"):
            return MAX_BATCH_BODY
        if path.endswith("/verify"):
            return MAX_VERIFY_RECORDS * VERIFY_RECORD.size
        if path.endswith("/commit"):
            return MAX_COMMIT_BODY
        return 0

    def _match(self, method: str, path: str) -> Tuple[str, Tuple[str, ...]]:
        path_found = False
        for m, regex, name in _ROUTES:
            found = regex.match(path)
            if found:
                path_found = True
                if m == method:
                    return name, found.groups()
        if path_found:
            raise InvalidInput(f"method {method} not allowed on {path}")
        raise NotFound(f"no such endpoint: {method} {path}")

    def _store(self, task: str, headers: Any) -> BlockTaskStore:
        value = headers.get("Authorization") or ""
        if not value.startswith("Bearer ") or not value[7:].strip():
            raise AuthFailed("block target: missing bearer token (Authorization: Bearer <task token>)")
        store = self.resolve(task, value[7:].strip())
        if store is None:
            raise AuthFailed("block target: unknown task or wrong task token")
        return store

    def authenticate(self, method: str, path: str, headers: Any) -> BlockRequest:
        """The route, the task's token and the session epoch, from the request line and headers
        alone. Raises NotFound/InvalidInput (no such route), AuthFailed (the request is not the
        task's) or StaleEpoch (another agent session holds the source now): its body must not be
        read (the caller closes the connection instead)."""
        route, args = self._match(method, path.split("?", 1)[0].rstrip("/"))
        store = self._store(args[0], headers)
        if self.fence is not None:  # a stale session's writes: refused, nothing read or written
            self.fence(args[0], headers.get(EPOCH_HEADER), writes=route in _WRITES)
        return BlockRequest(route, store, args[1], args, self.max_body(method, path))

    def admit(self, req: BlockRequest, headers: Any) -> BlockRequest:
        """What the task's own request may do, from its headers: the disk must be one the task
        declared and, for writes and commits, the disk size within the disk's limit; a commit's
        body is capped at the hashes of the chunks its headers declare. Raises the ServerError to
        answer (the token was right: the caller may read and drop the body to keep the connection)."""
        store, disk = req.store, req.disk
        store.admit_disk(disk)
        if req.route not in ("chunk", "batch", "commit"):
            return req
        disk_size = _int_header(headers, "X-Disk-Size")
        store.check_size(disk, disk_size)
        count = check_geometry(_int_header(headers, "X-Chunk-Size"), disk_size)
        if req.route == "commit":  # exactly the hashes of the chunks the headers declare
            return req._replace(max_body=count * HASH_LEN)
        return req

    def authorize(self, method: str, path: str, headers: Any) -> BlockRequest:
        """:meth:`authenticate` then :meth:`admit`: everything decided before the body is read."""
        return self.admit(self.authenticate(method, path, headers), headers)

    def serve(self, req: BlockRequest, headers: Any, body: Buffer) -> Tuple[int, dict]:
        """Answer an authorized request with its body (at most ``req.max_body`` bytes)."""
        try:
            if len(body) > req.max_body:
                raise TooLarge(f"request body of {len(body)} bytes is over the limit of {req.max_body} bytes")
            store, disk = req.store, req.disk
            if req.route == "chunk":
                return 200, self._chunk(store, disk, int(req.args[2]), headers, body or b"")
            if req.route == "batch":
                return 200, self._batch(store, disk, headers, body or b"")
            # verify and commit bodies are small: plain bytes; a chunk stays in its buffer
            if req.route == "verify":
                return 200, self._verify(store, disk, headers, bytes(body))
            if req.route == "commit":
                return 200, self._commit(store, disk, headers, bytes(body))
            return 200, store.state(disk)
        except ServerError as exc:
            if exc.http_status >= 500 and exc.http_status != 507:
                log.error("block %s of disk %s of task %s: %s", req.route, req.disk, req.args[0], exc)
            return _error(exc)

    def handle(self, method: str, path: str, headers: Any, body: Buffer) -> Tuple[int, dict]:
        """:meth:`authorize` then :meth:`serve`, for a body already read (tests, tools)."""
        try:
            req = self.authorize(method, path, headers)
        except ServerError as exc:
            return _error(exc)
        return self.serve(req, headers, body)

    def _chunk(self, store: BlockTaskStore, disk: str, index: int, headers: Any, body: Buffer) -> dict:
        chunk_size = _int_header(headers, "X-Chunk-Size")
        disk_size = _int_header(headers, "X-Disk-Size")
        encoding = (headers.get("X-Encoding") or "").strip().lower()
        length = chunk_len(index, chunk_size, disk_size)
        xxh3 = (headers.get("X-Chunk-Xxh3") or "").strip()
        b3 = headers.get("X-Chunk-Blake3")
        if xxh3 and not _HEX32.match(xxh3):
            raise InvalidInput("header X-Chunk-Xxh3: must be 32 hex digits (xxh3-128)")
        if b3 is not None and not _HEX64.match(b3.strip()):
            raise InvalidInput("header X-Chunk-Blake3: must be 64 hex digits (BLAKE3-256)")
        if encoding == "hole":
            if body:
                raise InvalidInput("a hole has no body")
            count = _int_header(headers, "X-Chunk-Count", default=1)
            if not 1 <= count <= MAX_HOLE_RUN:
                raise InvalidInput(f"header X-Chunk-Count: {count} must be 1-{MAX_HOLE_RUN}")
            if count == 1:
                store.write_chunk(disk, index, chunk_size, disk_size, None, xxh3)
            else:
                store.write_holes(disk, index, count, chunk_size, disk_size)
            return {"disk": disk, "index": index, "count": count, "bytes": 0}
        if not xxh3:
            raise InvalidInput("header X-Chunk-Xxh3 is missing")
        if encoding == "raw":
            data = body
        elif encoding == "zstd":
            data = decompress_chunk(body, length)
        else:
            raise InvalidInput(f"header X-Encoding: {encoding[:20]!r} must be raw, zstd or hole")
        store.write_chunk(disk, index, chunk_size, disk_size, data, xxh3, b3.strip() if b3 else None)
        return {"disk": disk, "index": index, "count": 1, "bytes": len(body)}

    def _batch(self, store: BlockTaskStore, disk: str, headers: Any, body: Buffer) -> dict:
        """Parse every frame, decompress and check every chunk, then write them all; a malformed
        or refused frame refuses the whole batch before anything of it is written."""
        chunk_size = _int_header(headers, "X-Chunk-Size")
        disk_size = _int_header(headers, "X-Disk-Size")
        view = memoryview(body)
        items: List[BatchItem] = []
        plain = 0
        off = 0
        while off < len(view):
            if len(items) == MAX_BATCH_FRAMES:
                raise InvalidInput(f"batch: more than {MAX_BATCH_FRAMES} frames")
            if off + FRAME.size > len(view):
                raise InvalidInput(f"batch: truncated frame header at byte {off}")
            index, count, size, enc_code, flags, digest = FRAME.unpack_from(view, off)
            off += FRAME.size
            encoding = ENCODINGS.get(enc_code)
            if encoding is None or flags & ~FLAG_BLAKE3:
                raise InvalidInput(f"batch: frame {len(items)} (chunk {index}): unknown encoding or flags")
            b3: Optional[str] = None
            if flags & FLAG_BLAKE3:
                if off + 32 > len(view):
                    raise InvalidInput(f"batch: truncated frame {len(items)} (chunk {index})")
                b3 = view[off:off + 32].hex()
                off += 32
            if off + size > len(view) or size > MAX_CHUNK_BODY:
                raise InvalidInput(f"batch: truncated frame {len(items)} (chunk {index}): payload of "
                                   f"{size} bytes")
            payload = view[off:off + size]
            off += size
            length = chunk_len(index, chunk_size, disk_size)
            xxh3 = "" if digest == _NO_HASH else digest.hex()
            if encoding == "hole":
                if size or b3 is not None:
                    raise InvalidInput(f"batch: chunk {index}: a hole has no payload")
                if not 1 <= count <= MAX_HOLE_RUN or (count > 1 and xxh3):
                    raise InvalidInput(f"batch: chunk {index}: a run of {count} holes (1-{MAX_HOLE_RUN}, "
                                       "without a hash)")
                items.append((index, count, None, xxh3, None))
                continue
            if count != 1:
                raise InvalidInput(f"batch: chunk {index}: a {encoding} frame must have a count of 1")
            if not xxh3:
                raise InvalidInput(f"batch: chunk {index}: no xxh3-128")
            plain += length
            if plain > MAX_BATCH_PLAIN:
                raise InvalidInput(f"batch: over {MAX_BATCH_PLAIN} bytes of chunk data")
            data = payload if encoding == "raw" else decompress_chunk(payload, length)
            items.append((index, 1, data, xxh3, b3))
        if not items:
            raise InvalidInput("batch: no frames")
        store.write_batch(disk, chunk_size, disk_size, items)
        return {"disk": disk, "chunks": len(items), "first": items[0][0], "bytes": len(body)}

    def _verify(self, store: BlockTaskStore, disk: str, headers: Any, body: bytes) -> dict:
        chunk_size = _int_header(headers, "X-Chunk-Size")
        if len(body) % VERIFY_RECORD.size:
            raise InvalidInput(f"body: verify records are {VERIFY_RECORD.size} bytes each")
        items: List[Tuple[int, bytes]] = [VERIFY_RECORD.unpack_from(body, off)
                                          for off in range(0, len(body), VERIFY_RECORD.size)]
        # each chunk is read at most once per request: the reads are bounded by the image
        if len({index for index, _ in items}) != len(items):
            raise InvalidInput("body: a chunk index is given twice in one verify request (each chunk once)")
        differ = store.verify_indices(disk, items, chunk_size)
        return {"disk": disk, "checked": len(items), "differ": differ}

    def _commit(self, store: BlockTaskStore, disk: str, headers: Any, body: bytes) -> dict:
        cycle = _int_header(headers, "X-Cycle")
        disk_size = _int_header(headers, "X-Disk-Size")
        chunk_size = _int_header(headers, "X-Chunk-Size")
        return store.commit(disk, cycle, disk_size, body, chunk_size)
