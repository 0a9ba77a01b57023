"""Client allow lists (`tunnel._allow`)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel._allow import MAX_ENTRIES, AllowList, DenyList


def test_networks_and_single_addresses() -> None:
    allow = AllowList.parse(["203.0.113.0/24", "198.51.100.7", "2001:db8::/32"])
    assert allow.admits("203.0.113.200")
    assert allow.admits("198.51.100.7")
    assert not allow.admits("198.51.100.8")
    assert allow.admits("2001:db8:1::5")
    assert not allow.admits("2001:db9::5")
    assert not allow.admits("127.0.0.1")


def test_ipv4_clients_seen_as_mapped_ipv6_match_ipv4_networks() -> None:
    allow = AllowList.parse(["127.0.0.0/8"])
    assert allow.admits("::ffff:127.0.0.1")
    assert not allow.admits("::ffff:10.0.0.1")


def test_host_bits_are_ignored_and_entries_are_normalised() -> None:
    assert AllowList.parse(["10.1.2.3/8", " ::1 "]).entries() == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize("host", ["", "localhost", "unix:/x", "1.2.3.4.5"])
def test_what_is_not_an_address_is_refused(host: str) -> None:
    assert not AllowList.parse(["0.0.0.0/0", "::/0"]).admits(host)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "at least one"),
        ("10.0.0.0/8", "is a list"),
        (None, "is a list"),
        ({"10.0.0.0/8": 1}, "is a list"),
        (["10.0.0.0/33"], "'10.0.0.0/33' is not an IP network"),
        (["example.com"], "'example.com' is not an IP network"),
        ([8], "8 is not a network"),
        ([f"10.0.0.{i}" for i in range(MAX_ENTRIES + 1)], f"at most {MAX_ENTRIES}"),
    ],
)
def test_bad_lists_say_why(entries: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AllowList.parse(entries)


@given(
    network=st.ip_addresses(v=4).flatmap(
        lambda a: st.integers(0, 32).map(lambda n: ipaddress.ip_network(f"{a}/{n}", False))
    ),
    host=st.ip_addresses(v=4),
)
def test_admits_exactly_the_addresses_in_the_network(
    network: ipaddress.IPv4Network, host: ipaddress.IPv4Address
) -> None:
    assert AllowList.parse([str(network)]).admits(str(host)) == (host in network)


# -- deny lists ---------------------------------------------------------------------------------


def test_deny_lists_refuse_the_listed_and_admit_the_rest() -> None:
    deny = DenyList.parse(["203.0.113.0/24", "2001:db8::/32"])
    assert not deny.admits("203.0.113.9")
    assert not deny.admits("::ffff:203.0.113.9")
    assert not deny.admits("2001:db8::1")
    assert deny.admits("198.51.100.1")
    assert deny.admits("2001:db9::1")


@pytest.mark.parametrize("host", ["", "localhost", "unix:/x"])
def test_a_deny_list_refuses_what_is_not_an_address(host: str) -> None:
    assert not DenyList.parse(["192.0.2.1"]).admits(host)


def test_deny_list_messages_name_the_deny_list() -> None:
    with pytest.raises(ValueError, match="a deny list needs at least one"):
        DenyList.parse([])
    with pytest.raises(ValueError, match="a deny list holds at most"):
        DenyList.parse([f"10.0.0.{i}" for i in range(MAX_ENTRIES + 1)])
    assert DenyList.parse(["::1"]) != AllowList.parse(["::1"])
    assert repr(DenyList.parse(["::1"])) == "DenyList(['::1/128'])"


@given(
    network=st.ip_addresses(v=6).flatmap(
        lambda a: st.integers(0, 128).map(lambda n: ipaddress.ip_network(f"{a}/{n}", False))
    ),
    host=st.ip_addresses(v=6),
)
def test_deny_refuses_exactly_the_addresses_in_the_network(
    network: ipaddress.IPv6Network, host: ipaddress.IPv6Address
) -> None:
    if host.ipv4_mapped is not None:
        return  # matched as its IPv4 address
    assert DenyList.parse([str(network)]).admits(str(host)) == (host not in network)
