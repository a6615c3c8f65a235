"""Pattern normalization must give the very route string Nest computes."""

from __future__ import annotations

import json
import random
import shutil
import string
import subprocess
import tracemalloc

import pytest

from nestpy_mini.patterns import collation_key, normalize_pattern, route_of_incoming


@pytest.mark.parametrize(
    ("pattern", "route"),
    [
        ("user_created", "user_created"),
        (42, "42"),
        (1.5, "1.5"),
        ({"cmd": "sum"}, '{"cmd":"sum"}'),
        ({"role": "math", "cmd": "sum"}, '{"cmd":"sum","role":"math"}'),
        ({"cmd": 'say "hi"'}, '{"cmd":"say \\"hi\\""}'),
        ({"n": 1, "ok": True, "none": None}, '{"n":1,"none":null,"ok":true}'),
        ({"a": {"y": 1, "x": "2"}}, '{"a":{"x":"2","y":1}}'),
        ([1, 2], '{"0":1,"1":2}'),
    ],
)
def test_routes_match_nest(pattern: object, route: str) -> None:
    assert normalize_pattern(pattern) == route


def test_mixed_keys_sort_like_localecompare() -> None:
    # Read off Node 20 (ICU): punctuation, then digits, then letters with
    # lower case before upper case only as a tie-breaker.
    pattern = {"Zeta_1": "z", "alpha": "a", "_under": "u", "B2": "b", "a10": "x", "a9": "y"}
    assert normalize_pattern(pattern) == (
        '{"_under":"u","a10":"x","a9":"y","alpha":"a","B2":"b","Zeta_1":"z"}'
    )
    keys = ["b", "B", "a", "A", "aB", "Ab", "ab", "AB", "x_y", "xy", "x-y", "1", "10", "9"]
    assert sorted(keys, key=collation_key) == [
        "1",
        "10",
        "9",
        "a",
        "A",
        "ab",
        "aB",
        "Ab",
        "AB",
        "b",
        "B",
        "x_y",
        "x-y",
        "xy",
    ]


def test_too_deep_and_too_wide_patterns_are_capped_like_nest() -> None:
    deep: dict = {"v": 1}
    for _ in range(7):
        deep = {"k": deep}
    assert "[MAX_DEPTH_REACHED]" in normalize_pattern(deep)
    assert normalize_pattern({f"k{i}": i for i in range(21)}) == "[TOO_MANY_KEYS]"


def test_incoming_string_patterns_are_normalized_again() -> None:
    assert route_of_incoming('{"role":"math","cmd":"sum"}') == '{"cmd":"sum","role":"math"}'
    assert route_of_incoming("{not json") == "{not json"
    assert route_of_incoming({"cmd": "sum"}) == '{"cmd":"sum"}'


def test_a_string_pattern_json_parse_refuses_is_matched_as_it_is() -> None:
    # JSON.parse refuses NaN and Infinity, so Nest routes such text unparsed;
    # Python's own parser would read it and reorder the keys.
    for text in ('{"z":NaN,"a":"x"}', '{"z":-Infinity,"a":"x"}'):
        assert route_of_incoming(text) == text
    assert route_of_incoming('{"z":1e999,"a":"x"}') == '{"a":"x","z":Infinity}'


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_random_ascii_keys_sort_exactly_as_node_does() -> None:
    rng = random.Random(20261127)
    alphabet = string.ascii_letters + string.digits + "_-$."
    keys = sorted(
        {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(400)}
    )
    script = (
        "const k=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "k.sort((a,b)=>(''+a).localeCompare(b));process.stdout.write(JSON.stringify(k))"
    )
    node = subprocess.run(
        ["node", "-e", script], input=json.dumps(keys), capture_output=True, text=True, check=True
    )
    assert sorted(keys, key=collation_key) == json.loads(node.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_float_values_in_a_route_are_written_as_javascript_writes_them() -> None:
    rng = random.Random(7)
    values = [0.1, -2.5, 1e21, 1.5e300, 1e-7, 0.000001, 0.00001, 123456.789, -1e-300, 5e-324]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(300)]
    values += [2**53 + 1, -(10**22) - 7, 12345678901234567890123]  # ints past a double's digits
    script = (
        "const v=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "process.stdout.write(JSON.stringify(v.map(String)))"
    )
    node = subprocess.run(
        ["node", "-e", script], input=json.dumps(values), capture_output=True, text=True, check=True
    )
    routes = [normalize_pattern({"v": value}) for value in values]
    assert routes == ['{"v":' + text + "}" for text in json.loads(node.stdout)]
    assert normalize_pattern({"v": float("inf")}) == '{"v":Infinity}'
    assert normalize_pattern({"v": 10**400}) == '{"v":Infinity}'


def test_long_incoming_patterns_are_routed_but_not_kept() -> None:
    """A broker peer can send any pattern; routing must not keep what it sends."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            text = json.dumps({"pad": "x" * 50_000, "cmd": str(i)}, separators=(",", ":"))
            assert route_of_incoming(text).startswith(f'{{"cmd":"{i}"')
            assert route_of_incoming({"cmd": str(i), "pad": "y" * 50_000}).endswith('y"}')
            assert route_of_incoming({"k" * 5_000 + str(i): "v"}).endswith(f'{i}":"v"}}')
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Kept, the patterns would take 20 MB, and the long keys' sort keys 12 MB more.
    assert kept < 1_000_000
    short = {"cmd": "kept"}
    assert route_of_incoming(short) is route_of_incoming(dict(short))  # short ones are cached
