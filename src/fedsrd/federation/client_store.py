"""Per-client state kept off the heap: one safetensors file per client, written atomically.

A simulation keeps, for every client, what that client holds between the rounds it is sampled in: its personal
tensors (`Algorithm.personal`, FedSA-LoRA) and its error-feedback residuals (`Algorithm.client_update_with_memory`,
fedsrd_ef). With a thousand clients that is a thousand adapters' worth of tensors; `DiskClientStore` keeps them in
files instead (``client_states/<kind>/client_NNNNNN.safetensors``), read when a client trains and written when it is
done, so the simulating process holds one client's state at a time.

Writes are atomic (a temporary file, fsync, ``os.replace``, fsync of the directory): a crash leaves either the old
file or the new one. A checkpoint snapshots the store by hard links (`snapshot`; a copy where links are impossible),
which costs no space until a client's file is replaced, and records each file's SHA-256; resuming restores the
snapshot (`restore`) and checks every digest, so a run killed at any instant resumes with the same bits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedsrd.federation.files import atomic_write_bytes
from fedsrd.ops.aligned import aligned_state

State = dict[str, torch.Tensor]
STORE_KINDS = ("auto", "memory", "disk")


def uses_disk_store(mode: str, num_clients: int, threshold: int) -> bool:
    """Whether per-client state goes to disk: `mode` 'disk', or 'auto' with at least `threshold` clients."""
    if mode not in STORE_KINDS:
        raise ValueError(f"client_state_store must be one of {STORE_KINDS}, got {mode!r}.")
    return mode == "disk" or (mode == "auto" and num_clients >= threshold)


class DiskClientStore(MutableMapping[int, State]):
    """A mapping client id -> named tensors whose values live in `directory`, one safetensors file per client.

    Iterates in ascending client id. Reading a client loads its file; nothing is cached. A new store empties
    `directory` (its files belong to a run that is being replaced or is about to be restored from a checkpoint).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._digests: dict[int, str] = {}  # client id -> SHA-256 of its file's bytes

    def path(self, client_id: int) -> Path:
        return self.directory / f"client_{int(client_id):06d}.safetensors"

    def __getitem__(self, client_id: int) -> State:
        if client_id not in self._digests:
            raise KeyError(client_id)
        return aligned_state(load_bytes(self.path(client_id).read_bytes()))

    def __setitem__(self, client_id: int, state: State) -> None:
        data = save_bytes({k: v.detach().to("cpu").contiguous() for k, v in state.items()})
        atomic_write_bytes(self.path(client_id), data)
        _fsync_dir(self.directory)
        self._digests[int(client_id)] = hashlib.sha256(data).hexdigest()

    def __delitem__(self, client_id: int) -> None:
        if client_id not in self._digests:
            raise KeyError(client_id)
        self.path(client_id).unlink()
        del self._digests[client_id]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._digests))

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._digests

    def clear(self) -> None:
        for client_id in list(self._digests):
            del self[client_id]

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def snapshot(self, destination: str | Path) -> dict[str, str]:
        """Link (or copy) every client's file into `destination`; returns client id (as text) -> SHA-256."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        for client_id in self:
            _link_or_copy(self.path(client_id), destination / self.path(client_id).name)
        _fsync_dir(destination)
        return {str(cid): digest for cid, digest in sorted(self._digests.items())}

    def restore(self, source: str | Path, digests: dict[str, str]) -> None:
        """Replace the store's contents by a `snapshot` in `source`, checking every file against `digests`."""
        source = Path(source)
        self.clear()
        for text, digest in sorted(digests.items(), key=lambda item: int(item[0])):
            client_id = int(text)
            src = source / self.path(client_id).name
            if not src.is_file() or _sha256(src) != digest:
                raise ValueError(f"client state {src} is missing or does not match the digest in its checkpoint.")
            _link_or_copy(src, self.path(client_id))
            self._digests[client_id] = digest
        _fsync_dir(self.directory)


def read_snapshot(source: str | Path, digests: dict[str, str]) -> dict[int, State]:
    """The states of a `DiskClientStore.snapshot` as an in-memory dict (a run resumed with the in-memory store)."""
    states = {}
    for text, digest in sorted(digests.items(), key=lambda item: int(item[0])):
        path = Path(source) / f"client_{int(text):06d}.safetensors"
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"client state {path} is missing or does not match the digest in its checkpoint.")
        states[int(text)] = load_bytes(data)
    return states


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["STORE_KINDS", "DiskClientStore", "read_snapshot", "uses_disk_store"]
