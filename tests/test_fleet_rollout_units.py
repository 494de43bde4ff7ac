"""fleet/rollout.py's pure parts: --stages, stage sizes, --max-failures, --select against a
real registry, and which running rollouts count as abandoned."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.registry import Registry
from fleet.rollout import (
    LEASE_S,
    RolloutError,
    parse_max_failures,
    parse_stages,
    select_devices,
    stage_sizes,
    stale_rollouts,
)

# --- parse_stages --------------------------------------------------------------------------


def test_parse_stages_percentages() -> None:
    assert parse_stages("1,10,50,100") == [1.0, 10.0, 50.0, 100.0]
    assert parse_stages(" 5% , 25%,100 ") == [5.0, 25.0, 100.0]
    assert parse_stages("0.5,100") == [0.5, 100.0]
    assert parse_stages("100") == [100.0]


def test_parse_stages_counts_with_all_last() -> None:
    assert parse_stages("1,5,20", counts=True) == [1.0, 5.0, 20.0]
    assert parse_stages("2,all", counts=True) == [2.0, math.inf]
    assert parse_stages("all", counts=True) == [math.inf]
    assert parse_stages("500", counts=True) == [500.0]  # counts have no upper limit


@pytest.mark.parametrize(
    ("text", "counts", "message"),
    [
        ("1,x,100", False, "'x' is not a number"),
        ("", False, "'' is not a number"),
        ("1,,100", False, "'' is not a number"),
        ("all", False, "'all' is not a number"),  # `all` only with --counts
        ("0,50,100", False, "must be a percentage in (0, 100]"),
        ("-5,100", False, "must be a percentage in (0, 100]"),
        ("50,101", False, "must be a percentage in (0, 100]"),
        ("1.5,3", True, "must be a whole count > 0"),
        ("0,3", True, "must be a whole count > 0"),
        ("10,5,100", False, "strictly increasing"),
        ("10,10,100", False, "strictly increasing"),
        ("all,5", True, "strictly increasing"),
        ("3,all,all", True, "strictly increasing"),
    ],
)
def test_parse_stages_refuses(text: str, counts: bool, message: str) -> None:
    with pytest.raises(RolloutError) as err:
        parse_stages(text, counts=counts)
    assert message in str(err.value)
    assert f"--stages {text!r}" in str(err.value)


@pytest.mark.parametrize(("text", "counts"), [("nan", False), ("inf", True), ("nan", True)])
def test_parse_stages_refuses_non_finite(text: str, counts: bool) -> None:
    with pytest.raises(RolloutError, match="must be"):
        parse_stages(text, counts=counts)


# --- stage_sizes ---------------------------------------------------------------------------


def test_stage_sizes_percentages_round_up_and_start_with_one() -> None:
    assert stage_sizes([1, 10, 50, 100], 100) == [1, 10, 50, 100]
    assert stage_sizes([10, 50, 100], 20) == [2, 10, 20]
    assert stage_sizes([1, 10, 50, 100], 20) == [1, 2, 10, 20]  # 1% of 20 is still one
    assert stage_sizes([1, 10, 50, 100], 7) == [1, 4, 7]  # ceil(0.7)=1, ceil(3.5)=4
    assert stage_sizes([33.3, 66.6, 100], 3) == [1, 2, 3]
    assert stage_sizes([10, 20, 30], 1000) == [100, 200, 300]  # the last need not be 100 %


def test_stage_sizes_drop_stages_that_add_no_device() -> None:
    assert stage_sizes([1, 10, 50, 100], 1) == [1]
    assert stage_sizes([1, 10, 50, 100], 2) == [1, 2]
    assert stage_sizes([1, 2, 3, 100], 10) == [1, 10]


def test_stage_sizes_counts() -> None:
    assert stage_sizes([1, 5, math.inf], 20, counts=True) == [1, 5, 20]
    assert stage_sizes([2, 50], 20, counts=True) == [2, 20]  # capped at the selection
    assert stage_sizes([5, 10, math.inf], 8, counts=True) == [5, 8]
    assert stage_sizes([math.inf], 3, counts=True) == [3]


# --- parse_max_failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "total", "limit"),
    [
        ("5%", 100, 5),
        ("5%", 20, 1),
        ("5%", 19, 0),  # 0.95 rounds down: the first failure halts
        ("10%", 30, 3),  # 10 % of 30 is 3 exactly, not 2.9999
        ("0%", 50, 0),
        ("100%", 7, 7),
        ("2.5%", 200, 5),
        (" 5% ", 40, 2),
        ("2", 100, 2),
        ("0", 100, 0),
        ("250", 10, 250),  # an absolute count is not capped
    ],
)
def test_parse_max_failures(text: str, total: int, limit: int) -> None:
    assert parse_max_failures(text, total) == limit


@pytest.mark.parametrize("text", ["", "-1", "-5%", "101%", "five", "5 %%", "1.5", "%"])
def test_parse_max_failures_refuses(text: str) -> None:
    with pytest.raises(RolloutError, match="expected a percentage like 5% or a count like 2"):
        parse_max_failures(text, 100)


# --- select_devices against a real registry -----------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry.db") as reg:
        for dev in ("cam-3", "cam-1", "cam-2", "door-1", "old-1"):
            reg.update_status(dev, {"status": "online", "version": "1.0"})
        reg.set_tags("cam-1", ["lobby", "canary"])
        reg.set_tags("cam-2", ["lobby"])
        reg.set_tags("old-1", ["lobby"])
        reg.set_revoked("old-1")
        yield reg


def _ids(devices: list) -> list[str]:
    return [d.id for d in devices]


def test_select_all_sorted_without_revoked(registry: Registry) -> None:
    assert _ids(select_devices(registry, "all")) == ["cam-1", "cam-2", "cam-3", "door-1"]


def test_select_by_tag(registry: Registry) -> None:
    assert _ids(select_devices(registry, "tag=lobby")) == ["cam-1", "cam-2"]  # old-1 revoked
    assert _ids(select_devices(registry, "tag=canary")) == ["cam-1"]


def test_select_ids_keep_the_given_order(registry: Registry) -> None:
    assert _ids(select_devices(registry, "door-1, cam-3,cam-1")) == ["door-1", "cam-3", "cam-1"]


def test_select_unknown_or_revoked_ids_are_refused(registry: Registry) -> None:
    with pytest.raises(RolloutError, match=r"unknown device\(s\) nope, old-1"):
        select_devices(registry, "cam-1,nope,old-1")


def test_select_nothing_is_refused(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match="'tag=attic' matches no device"):
        select_devices(registry, "tag=attic")
    with pytest.raises(RolloutError, match="matches no device"):
        select_devices(registry, " , ")
    with (
        Registry(tmp_path / "empty.db") as empty,
        pytest.raises(RolloutError, match="'all' matches no device"),
    ):
        select_devices(empty, "all")


# --- stale_rollouts ------------------------------------------------------------------------


def test_stale_rollouts_are_running_ones_without_a_fresh_heartbeat(registry: Registry) -> None:
    pid = "ab" * 32
    rows: list[tuple[str, str | None]] = [("cam-1", None)]
    never, fresh, old, done = (
        registry.create_rollout(pid, "cam", "all", [1], 0, 60.0, rows) for _ in range(4)
    )
    now = 1_000_000.0
    registry.set_rollout(fresh, heartbeat=now - LEASE_S + 1)
    registry.set_rollout(old, heartbeat=now - LEASE_S - 1)
    registry.set_rollout(done, state="completed")
    assert stale_rollouts(registry, now) == [never, old]


def test_claiming_a_rollout_is_won_once_and_only_when_its_driver_is_gone(
    registry: Registry,
) -> None:
    pid = "cd" * 32
    rows: list[tuple[str, str | None]] = [("cam-1", None)]
    stale, live, done = (
        registry.create_rollout(pid, "cam", "all", [1], 0, 60.0, rows) for _ in range(3)
    )
    now = 2_000_000.0
    registry.set_rollout(stale, heartbeat=now - LEASE_S - 5)
    registry.set_rollout(live, heartbeat=now - 2)
    registry.set_rollout(done, state="halted")
    assert registry.claim_rollout(stale, LEASE_S, now) is True
    assert registry.rollout(stale)["heartbeat"] == now
    assert registry.claim_rollout(stale, LEASE_S, now + 1) is False  # now it has a driver
    assert registry.claim_rollout(live, LEASE_S, now) is False
    assert registry.claim_rollout(done, LEASE_S, now) is False
