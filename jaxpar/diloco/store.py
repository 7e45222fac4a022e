"""The sync store of Streaming DiLoCo islands: its layout and wire format. Every read and
write of the islands protocol (`jaxpar.diloco.islands`) goes through `SyncStore`.

The store is a tensorstore key-value store (the layer orbax already uses for checkpoints), so
one code path serves a local or network folder (`/shared/run7/sync`, `file://...`), `gs://`
and `s3://`: no second client library, and its conditional write
`write(key, value, if_equal=generation)` is the only primitive the protocol needs. With the
generation of a read of a missing key it creates the key only if it is still absent (measured
on the file driver; GCS and S3 implement it with their conditional-create requests).

Layout under the store root (`{r}` a round number, 8 digits; `{k}` an island id, 4 digits;
`{s}` a session: the random id an island process draws when it starts):

  settings.json             the settings that change the outer math. Written by the first
                            island to join (create-if-absent); a joining island whose settings
                            differ is refused, naming the keys. Never deleted.
  islands/{k}.json          {session, host, pid, time}: the live session of id k. Written by
                            island k at join, compare-and-swap on the generation it read (two
                            processes with one id: one swap fails). Never deleted.
  heartbeat/{k}.json        {session, beat, time, step, joins_round, every, closed}: rewritten
                            by island k's heartbeat thread every heartbeat_s. A second process
                            with id k sees `beat` advance and stops; `joins_round` announces a
                            rejoin. Never deleted.
  rounds/{r}/delta-{k}-{s}  island k's outer gradients of fragment r mod P (every local
                            replica, in the `quantize` wire format: codes + per-block scales),
                            with the digest of its θ_global[p] and outer state before the
                            round. Written once by island k, in the background, at round r's
                            sync step.
  rounds/{r}/record.json    the agreed round: {round, fragment, step, members, corrupt, keys,
                            digests, replicas, closer}. Created once (create-if-absent) by the first
                            island that sees every expected delta or passes the deadline;
                            every island uses it, whatever it saw itself.
                            rounds/{r}/ is deleted by the closer of round r + R.
  global/{n}                θ_global and the outer state of every fragment after n rounds
                            (n = 0: the initial state, created by the first island). Written by
                            the closer of round n−1 when n is a multiple of P (once every H
                            steps: it is the whole model and outer state); rejoining islands
                            start from the newest and replay the rounds after it. The closers
                            keep the newest two.

R (`keep_rounds`) is at least 3·P + 2, so a rejoining island finds the records and deltas of
every round after the newest global state even when one publication was lost.

Blob format (deltas and global states), checked on every read, so a torn or corrupt file is
detected and named:

  b"JXPISL1\\n" | uint32 little-endian header length | header (JSON) | body
  header: {"kind", ..., "arrays": [[name, dtype, shape], ...], "body_bytes", "sha256"}
  body:   the arrays' raw bytes, C order, concatenated in header order
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct

import numpy as np

MAGIC = b"JXPISL1\n"


class IslandError(ValueError):
    """A one-line error of the islands protocol: bad settings, a bad or unreachable store, a
    duplicate island id, missing or corrupt store state."""


class CorruptBlob(IslandError):
    """A blob whose framing, length or checksum is wrong (a torn or corrupt write)."""


# ------------------------------------------------------------------------ keys
SETTINGS = "settings.json"


def registry_key(k: int) -> str:
    return f"islands/{k:04d}.json"


def heartbeat_key(k: int) -> str:
    return f"heartbeat/{k:04d}.json"


def round_prefix(r: int) -> str:
    return f"rounds/{r:08d}/"


def delta_key(r: int, k: int, session: str) -> str:
    return f"{round_prefix(r)}delta-{k:04d}-{session}"


def record_key(r: int) -> str:
    return f"{round_prefix(r)}record.json"


def global_key(n: int) -> str:
    return f"global/{n:08d}"


_DELTA = re.compile(r"^rounds/(\d{8})/delta-(\d{4})-([0-9a-f]+)$")
_RECORD = re.compile(r"^rounds/(\d{8})/record\.json$")
_GLOBAL = re.compile(r"^global/(\d{8})$")


# ------------------------------------------------------------------------ blobs
def digest(arrays) -> str:
    """sha256 of the raw bytes of arrays, in order: the identity of a state or a delta."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def pack(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    body = b"".join(a.tobytes() for a in arrays.values())
    header = dict(header, arrays=[[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()],
                  body_bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def unpack(blob: bytes, what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a blob; CorruptBlob naming `what` if anything does not add up."""
    try:
        if blob[:len(MAGIC)] != MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
        start = len(MAGIC) + 4
        header = json.loads(blob[start:start + n])
        body = blob[start + n:]
        if len(body) != header["body_bytes"]:
            raise ValueError(f"{len(body)} body bytes, header says {header['body_bytes']}")
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            raise ValueError("sha256 mismatch")
        arrays, off = {}, 0
        for name, dtype, shape in header["arrays"]:
            dt = np.dtype(dtype)
            size = int(np.prod(shape)) * dt.itemsize
            arrays[name] = np.frombuffer(body[off:off + size], dt).reshape(shape)
            off += size
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptBlob(f"{what} is torn or corrupt ({e})") from None
    return header, arrays


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# ------------------------------------------------------------------------ the store
class SyncStore:
    """The store at `url`: a folder path, `file://`, `gs://` or `s3://` (tensorstore kvstore)."""

    def __init__(self, url: str):
        import tensorstore as ts

        self.url, self._ts = url, ts
        spec = url if "://" in url else {"driver": "file", "path": os.path.abspath(url)}
        if isinstance(spec, str) and not spec.endswith("/"):
            spec += "/"
        if isinstance(spec, dict):
            spec["path"] = spec["path"].rstrip("/") + "/"
        try:
            self.kv = ts.KvStore.open(spec).result()
        except Exception as e:  # tensorstore raises ValueError/OSError subclasses per driver
            raise IslandError(f"diloco.islands.store={url!r} cannot be opened: "
                              f"{_one_line(e)}") from None

    def _fail(self, op: str, key: str, e: BaseException):
        raise IslandError(f"sync store {self.url!r}: {op} {key} failed: {_one_line(e)}") from None

    def get(self, key: str):
        """(bytes or None if missing, generation)."""
        try:
            r = self.kv.read(key).result()
        except Exception as e:
            self._fail("read", key, e)
        return (r.value if r.state == "value" else None), r.stamp.generation

    def put(self, key: str, value: bytes) -> None:
        try:
            self.kv.write(key, value).result()
        except Exception as e:
            self._fail("write", key, e)

    def put_if(self, key: str, value: bytes, generation) -> bool:
        """Write only if the key still has `generation` (that of a read of it; for a missing key
        this is create-if-absent). True if this call wrote it."""
        try:
            stamp = self.kv.write(key, value, if_equal=generation).result()
        except Exception as e:
            self._fail("write", key, e)
        return bool(stamp.generation)

    def create(self, key: str, value: bytes) -> bool:
        """Create-if-absent: True if this call created the key."""
        current, gen = self.get(key)
        if current is not None:  # with the generation of a present key this would overwrite
            return False
        return self.put_if(key, value, gen)  # the generation of a missing key: only-if-absent

    def keys(self, prefix: str) -> list[str]:
        try:
            ks = self.kv.list(self._ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()
        except Exception as e:
            self._fail("list", prefix, e)
        return sorted(k.decode() for k in ks)

    def delete_prefix(self, prefix: str) -> None:
        try:
            self.kv.delete_range(self._ts.KvStore.KeyRange(prefix, prefix + "\xff")).result()
        except Exception as e:
            self._fail("delete", prefix, e)

    # -------------------------------------------------------------------- typed access
    def get_json(self, key: str):
        value, gen = self.get(key)
        if value is None:
            return None, gen
        try:
            return json.loads(value), gen
        except ValueError:
            raise CorruptBlob(f"{self.url}/{key} is not valid JSON (torn or corrupt)") from None

    def probe(self, session: str) -> None:
        """Fail in one line now if the store cannot be written, listed and deleted from."""
        key = f"probe/{session}"
        self.put(key, b"ok")
        if self.get(key)[0] != b"ok":
            raise IslandError(f"sync store {self.url!r}: a probe write did not read back")
        self.delete_prefix(key)

    def rounds_with_record(self) -> list[int]:
        return [int(m.group(1)) for k in self.keys("rounds/") if (m := _RECORD.match(k))]

    def deltas(self, r: int) -> dict[int, list[str]]:
        """Island id -> its delta keys in round r (several only if it restarted mid-round)."""
        out: dict[int, list[str]] = {}
        for k in self.keys(round_prefix(r)):
            if m := _DELTA.match(k):
                out.setdefault(int(m.group(2)), []).append(k)
        return out

    def session_of(self, key: str) -> str:
        return _DELTA.match(key).group(3)

    def global_indices(self) -> list[int]:
        return [int(m.group(1)) for k in self.keys("global/") if (m := _GLOBAL.match(k))]

    def all_rounds(self) -> list[int]:
        return sorted({int(k.split("/")[1]) for k in self.keys("rounds/") if k.count("/") >= 2})
