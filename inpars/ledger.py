"""One budget for the whole run: a ledger in the workspace that every shard books against.

``generate.budget_usd`` is a run-wide limit, whatever the number of shards, pods, retries and
resumes. The budget is cut into equal blocks (``_ledger/params.json``, fixed when the run first
books); a shard claims a block by creating ``_ledger/blocks/block-000017.json`` create-only, so two
shards can never hold the same block, and the blocks together never exceed the budget. A shard
spends only inside the blocks it holds; it notes how much it has used ahead of spending it
(``_ledger/used/<shard>.json``, a high-water mark written before the requests it covers are sent), so a
retried or resumed shard starts from what its earlier attempts may have spent. When a shard
finishes, it gives back the blocks it did not need. Raising the budget on ``resume`` adds blocks.

Only the shard's lease holder writes its used mark and claims in its name (see :mod:`inpars.leases`).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

from .storage import Storage

PREFIX = "_ledger"
BLOCKS_PER_SHARD = 8  # a block is budget / (8 * shards): little is held idle by any one shard


class Ledger:
    """One shard's view of the run's budget ledger (``storage`` is rooted at the run)."""

    def __init__(self, storage: Storage, budget_usd: float, shard: str, *, shards: int = 1):
        self.storage, self.budget, self.shard = storage, float(budget_usd), shard
        self.block = self._block_size(shards)
        self._lock = threading.Lock()
        self.owned: list[int] = self._owned()
        self.used_before = self._read_used()  # what earlier attempts of this shard may have spent
        self.mark = self.used_before  # the used mark as written

    # -------------------------------------------------------------- layout

    def _block_key(self, n: int) -> str:
        return f"{PREFIX}/blocks/block-{n:06d}.json"

    def _used_key(self) -> str:
        return f"{PREFIX}/used/{self.shard}.json"

    def _block_size(self, shards: int) -> float:
        """The run's block size: fixed by whoever books first (create-only), so resumes agree."""
        size = self.budget / (BLOCKS_PER_SHARD * max(1, shards))
        params = json.dumps({"block_usd": size}).encode()
        if not self.storage.create_if_absent(f"{PREFIX}/params.json", params):
            size = float(json.loads(self.storage.read_bytes(f"{PREFIX}/params.json"))["block_usd"])
        return size

    def _owned(self) -> list[int]:
        owned = []
        for key in self.storage.list(f"{PREFIX}/blocks/"):
            try:
                if json.loads(self.storage.read_bytes(key)).get("shard") == self.shard:
                    owned.append(int(key.rsplit("-", 1)[1].split(".")[0]))
            except (FileNotFoundError, ValueError):
                continue
        return sorted(owned)

    def _read_used(self) -> float:
        try:
            return float(json.loads(self.storage.read_bytes(self._used_key()))["used_usd"])
        except FileNotFoundError:
            return 0.0

    # -------------------------------------------------------------- booking

    @property
    def total_blocks(self) -> int:
        """Blocks the current budget allows (a raised budget on resume allows more)."""
        return int(math.floor(self.budget / self.block + 1e-9)) if self.block > 0 else 0

    @property
    def allowance(self) -> float:
        """What this shard may still spend in this attempt: its blocks, less what it used before."""
        return len(self.owned) * self.block - self.used_before

    def claim(self) -> bool:
        """Claim one more block for this shard; False when every block is taken."""
        with self._lock:
            taken = {int(k.rsplit("-", 1)[1].split(".")[0]) for k in self.storage.list(f"{PREFIX}/blocks/")}
            for n in range(self.total_blocks):
                if n in taken:
                    continue
                if self.storage.create_if_absent(self._block_key(n), json.dumps({"shard": self.shard}).encode()):
                    self.owned.append(n)
                    return True
            return False

    def ensure(self, needed: float) -> bool:
        """Hold enough blocks for ``needed`` more dollars in this attempt (claiming as needed)."""
        while self.allowance < needed:
            if not self.claim():
                return False
        return True

    def note_used(self, used_this_attempt: float, *, ahead: float = 0.0) -> None:
        """Write the used mark before money is committed: ``used_before + used_this_attempt + ahead``."""
        mark = self.used_before + used_this_attempt + ahead
        with self._lock:
            if ahead and mark <= self.mark:
                return
            self.mark = mark
            self.storage.write_bytes(self._used_key(), json.dumps({"used_usd": round(mark, 9), "shard": self.shard}).encode())

    def release_unused(self, used_this_attempt: float) -> int:
        """Finish: write the exact used mark and give back whole blocks this shard did not need."""
        self.note_used(used_this_attempt)
        keep = math.ceil((self.used_before + used_this_attempt) / self.block - 1e-9) if self.block > 0 else 0
        freed = 0
        with self._lock:
            for n in sorted(self.owned)[keep:]:
                self.storage.delete(self._block_key(n))
                self.owned.remove(n)
                freed += 1
        return freed

    def summary(self) -> dict[str, Any]:
        return {"budget_usd": self.budget, "block_usd": self.block, "blocks": len(self.owned), "used_before_usd": self.used_before}


def run_spend(storage: Storage) -> dict[str, float]:
    """Every shard's used mark (an upper bound of what it spent): ``{shard: USD}``."""
    out = {}
    for key in storage.list(f"{PREFIX}/used/"):
        try:
            out[key.rsplit("/", 1)[1].removesuffix(".json")] = float(json.loads(storage.read_bytes(key))["used_usd"])
        except (FileNotFoundError, ValueError, KeyError):
            continue
    return out
