"""The replicas' prefill speed: router-wide `prefill_tokens_per_s` and a backend's own, into the Fleet."""

from __future__ import annotations

from typing import Any

import pytest

from router.config import BackendConfig, ConfigError, RouterConfig, backend_from_mapping
from router.proxy import build_state


def test_the_router_rate_and_a_backends_own_reach_the_fleet() -> None:
    config = RouterConfig(
        backends=(
            BackendConfig("a", "http://127.0.0.1:1"),
            backend_from_mapping(
                {"name": "b", "url": "http://127.0.0.1:2", "prefill_tokens_per_s": 1500}, "b"
            ),
        ),
        prefill_tokens_per_s=6000,
    )
    state = build_state(config)
    rates = {name: r.prefill_tokens_per_s for name, r in state.fleet.replicas.items()}
    assert rates == {"a": 6000.0, "b": 1500.0}
    assert RouterConfig().prefill_tokens_per_s == 25_000.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "fast"])
def test_a_rate_must_be_a_positive_number(bad: Any) -> None:
    with pytest.raises(ConfigError, match="prefill_tokens_per_s must be a positive number"):
        RouterConfig(prefill_tokens_per_s=bad)
    with pytest.raises(ConfigError, match="prefill_tokens_per_s must be a positive number"):
        backend_from_mapping({"name": "b", "url": "http://127.0.0.1:2", "prefill_tokens_per_s": bad}, "b")
