"""Property-based fuzzing: mutated seeds of `tests/fuzz_corpus/` (and the real DICOM headers of the shared data)
fed to every reader and config parser; only each reader's own error type may come out (`bench.fuzz.feed`).

Bounded for CI: a fixed number of examples per test (`MAMMOFL_FUZZ_EXAMPLES`, default 40), no deadline,
derandomized (the same inputs on every run), no example database. `python -m bench.fuzz` runs the same harness
on 100,000 inputs.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import KINDS, OPERATIONS, TOKENS, Mutation, Workspace, feed, load_seeds, mutate, real_dicom_headers
from common.run_config import ConfigError, NodeConfig, RunConfig

FUZZ = settings(
    max_examples=int(os.environ.get("MAMMOFL_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEEDS = load_seeds(shared_dicom=None)  # the real headers have their own test (it needs the shared data)

mutation = st.builds(
    Mutation,
    operation=st.sampled_from(OPERATIONS),
    position=st.floats(0, 1),
    value=st.integers(0, 2**16),
    token=st.one_of(st.just(b""), st.sampled_from(TOKENS), st.binary(min_size=1, max_size=16)),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_seed_is_accepted_as_it_is(workspace, kind):
    """The seeds are valid inputs, so mutations start from what the readers accept."""
    assert [feed(kind, seed, workspace) for seed in SEEDS[kind]] == ["ok"] * len(SEEDS[kind])


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(choice=st.integers(0, 2**16), edits=mutations)
def test_mutated_inputs_never_escape(workspace, kind, choice, edits):
    seeds = SEEDS[kind]
    assert feed(kind, mutate(seeds[choice % len(seeds)], edits), workspace) in ("ok", "refused")


@pytest.fixture(scope="module")
def real_headers(dicom_dir):
    headers = real_dicom_headers(dicom_dir)
    assert len(headers) == 15
    return headers


@FUZZ
@given(choice=st.integers(0, 2**16), edits=mutations)
def test_mutated_real_dicom_headers_never_escape(workspace, real_headers, choice, edits):
    headers = real_headers
    assert feed("dicom", mutate(headers[choice % len(headers)], edits), workspace) in ("ok", "refused")


# ---------------------------------------------------------------- config parsers on typed values
# Found by these tests and fixed in common/run_config.py: an integer beyond float range for a numeric key
# (OverflowError), a path with a NUL byte (ValueError) and `~unknown-user/...` (RuntimeError) escaped as non-config
# errors.
CONFIG_FUZZ = settings(FUZZ, report_multiple_bugs=False)


@pytest.mark.parametrize("values, message", [({"lr": 10**400}, "'lr': 1000"),
                                             ({"num-server-rounds": 10**400}, "'num-server-rounds': must be finite")])
def test_run_config_huge_integer_is_a_config_error(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(values)


@pytest.mark.parametrize("path, message", [("a\x00b", "a path cannot contain a NUL byte"),
                                           ("~no-such-user-here/data", "cannot resolve path")])
def test_node_config_bad_paths_are_config_errors(path, message):
    with pytest.raises(ConfigError, match=f"node config 'data-dir': {message}"):
        NodeConfig.from_flower({"data-dir": path, "state-dir": "/var/lib/x", "max-epsilon": 1.0}, run=RunConfig())

config_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400), st.floats(), st.text(max_size=40),
    st.sampled_from(["", "nan", "inf", "-1", "1e308", "~nobody/x", "../..", "a\x00b", "x" * 5000]),
    st.binary(max_size=8), st.lists(st.integers(), max_size=3),
)
run_keys = st.one_of(st.sampled_from(sorted(RunConfig.defaults())), st.text(max_size=20))
node_keys = st.one_of(st.sampled_from(NodeConfig.KEYS), st.text(max_size=20))


@CONFIG_FUZZ
@given(values=st.dictionaries(run_keys, config_values, max_size=6))
def test_run_config_from_flower_raises_only_config_errors(values):
    try:
        RunConfig.from_flower(values)
    except ConfigError:
        pass


@CONFIG_FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=60), run_keys.map(lambda key: key + "=")
                                .flatmap(lambda prefix: config_values.map(lambda v: f"{prefix}{v}"))), max_size=5))
def test_parse_assignments_raises_only_config_errors(lines):
    try:
        RunConfig.from_flower(RunConfig.parse_assignments(lines))
    except ConfigError:
        pass


@CONFIG_FUZZ
@given(values=st.dictionaries(node_keys, config_values, max_size=6))
def test_node_config_from_flower_raises_only_config_errors(values):
    try:
        NodeConfig.from_flower(values, run=RunConfig())
    except ConfigError:
        pass
