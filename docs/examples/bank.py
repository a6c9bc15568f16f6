"""A small bank on phalanx, with a deliberately seeded bug, for the phalanx.testing guide.

Imported by the test process (the scenario runs there, against a
``SimRuntime`` or a real ``phalanx.Runtime``) and, by name, by the worker
processes of a real runtime, which host the ``Account`` actors; importing it
has no side effects.

Each account is a supervised actor (``restart_policy="on-failure"``): when
its worker process dies, phalanx restarts it on a live worker from its last
checkpoint (``save()``/``restore()``). A transfer is two calls, a withdrawal
and a deposit, each retried by the client when the actor died under it
(``ActorDiedError``), and each carrying a transaction id the account
remembers, so a retry is never applied twice.

The invariant the bank must keep: **money is conserved and every
acknowledged operation is durable** -- after any number of worker deaths
the balances are exactly what the acknowledged transfers say.

The seeded bug: accounts are opened with ``checkpoint_every=3`` "to save
I/O". A worker that dies between two checkpoints takes acknowledged
operations with it; the account comes back with an older balance and money
appears or vanishes. ``checkpoint_every=1`` (``FIXED``) closes that hole;
the harness then finds a narrower one in phalanx itself (a checkpoint still
in flight when the worker's death is noticed is ignored), described in
``docs/testing.md``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

import phalanx

#: the seeded bug: a checkpoint every 3 calls loses acknowledged operations on a crash
BUGGY = 3
#: the fix: a checkpoint after every call
FIXED = 1

#: what each account starts with
OPENING = 100
#: the transfers the scenario makes: (from, to, amount)
TRANSFERS = [("alice", "bob", 10), ("bob", "alice", 5), ("alice", "bob", 20), ("bob", "alice", 15)]


class InsufficientFunds(Exception):
    """A withdrawal larger than the balance (rebuilt by name in the driver)."""


class AccountState(msgspec.Struct, frozen=True):
    """What an account checkpoints: its balance and the transactions it applied."""

    owner: str
    balance: int
    applied: list[str] = []


@phalanx.actor
class Account:
    """One bank account; every operation carries a transaction id and is applied once."""

    def __init__(self, owner: str, balance: int = 0) -> None:
        self.owner = owner
        self.balance = balance
        self.applied: list[str] = []

    def deposit(self, txid: str, amount: int) -> int:
        if txid not in self.applied:
            self.balance += amount
            self.applied.append(txid)
        return self.balance

    def withdraw(self, txid: str, amount: int) -> int:
        if txid not in self.applied:
            if amount > self.balance:
                raise InsufficientFunds(f"{self.owner} has {self.balance}, cannot withdraw {amount}")
            self.balance -= amount
            self.applied.append(txid)
        return self.balance

    def get_balance(self) -> int:
        return self.balance

    def save(self) -> AccountState:
        return AccountState(self.owner, self.balance, list(self.applied))

    @classmethod
    def restore(cls, state: AccountState) -> Account:
        account = cls(state.owner, state.balance)
        account.applied = list(state.applied)
        return account


def open_account(rt: Any, owner: str, checkpoint_every: int) -> phalanx.ActorRef[Account]:
    """A supervised account holding :data:`OPENING`, checkpointed every ``checkpoint_every`` calls."""
    return rt.spawn(Account, owner, OPENING, restart_policy="on-failure", checkpoint_every=checkpoint_every)


def _retried(call: Any, attempts: int = 6) -> int:
    """``call()`` again, backing off, while the actor died under it (phalanx restarts it meanwhile)."""
    for attempt in range(attempts):
        try:
            return int(call().result(timeout=30))
        except phalanx.ActorDiedError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.005 * 2**attempt)
    raise AssertionError("unreachable")


def transfer(accounts: dict[str, phalanx.ActorRef[Account]], txid: str, src: str, dst: str, amount: int) -> None:
    """Move ``amount`` from ``src`` to ``dst``: a withdrawal, then a deposit, each retried."""
    _retried(lambda: accounts[src].withdraw(f"{txid}-out", amount))
    _retried(lambda: accounts[dst].deposit(f"{txid}-in", amount))


def bank_scenario(rt: Any, checkpoint_every: int = BUGGY) -> None:
    """Open two accounts, run :data:`TRANSFERS`, check the invariant. Raises AssertionError if broken."""
    accounts = {name: open_account(rt, name, checkpoint_every) for name in ("alice", "bob")}
    expected = {name: OPENING for name in accounts}
    for i, (src, dst, amount) in enumerate(TRANSFERS):
        try:
            transfer(accounts, f"t{i}", src, dst, amount)
        except phalanx.ActorDiedError:
            if any(ref.state == "failed" for ref in accounts.values()):
                return  # restarts ran out: the caller was told, nothing more to check
            raise
        expected[src] -= amount
        expected[dst] += amount
    try:
        balances = {name: _retried(ref.get_balance) for name, ref in accounts.items()}
    except phalanx.ActorDiedError:
        if any(ref.state == "failed" for ref in accounts.values()):
            return
        raise
    assert sum(balances.values()) == 2 * OPENING, f"money not conserved: {balances}"
    assert balances == expected, f"acknowledged transfers lost: balances {balances}, expected {expected}"
    for ref in accounts.values():
        ref.stop()


def fixed_bank_scenario(rt: Any) -> None:
    """:func:`bank_scenario` with the fix: a checkpoint after every call."""
    bank_scenario(rt, checkpoint_every=FIXED)
