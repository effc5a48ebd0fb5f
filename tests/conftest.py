"""Shared fixtures: hand-computable and small random models, built in-process (no network)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import shape_checks
import torch as t

# The test models are tiny: one thread avoids thread-pool overhead dominating every op.
t.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")
    parser.addoption(
        "--no-shape-checks",
        action="store_true",
        default=False,
        help="don't check auto_circuit's jaxtyping shape annotations at run time",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports auto_circuit (see shape_checks.py).
    if not config.getoption("--no-shape-checks"):
        shape_checks.install("auto_circuit")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from auto_circuit.engine.settings import fast_paths_default

    if not fast_paths_default():  # the suite's second run, on the reference engine
        skip_fast = pytest.mark.skip(reason="tests a fast path; AUTO_CIRCUIT_FAST_PATHS=0")
        for item in items:
            if "fast_paths" in item.keywords:
                item.add_marker(skip_fast)
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def make_tl_model(
    n_layers: int = 3,
    n_heads: int = 4,
    d_model: int = 16,
    d_vocab: int = 50,
    attn_only: bool = False,
    parallel_attn_mlp: bool = False,
    seed: int = 0,
    **cfg_kwargs,
):
    """A small random HookedTransformer with frozen weights scaled so patches matter."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg_kwargs.setdefault("normalization_type", "LN")
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=None if attn_only else 2 * d_model,
        n_ctx=32,
        d_vocab=d_vocab,
        act_fn=None if attn_only else "gelu",
        attn_only=attn_only,
        parallel_attn_mlp=parallel_attn_mlp,
        seed=seed,
        **cfg_kwargs,
    )
    model = HookedTransformer(cfg)
    gen = t.Generator().manual_seed(seed)
    with t.no_grad():
        for name, param in model.named_parameters():
            # Larger query/key weights give peaked attention, so K/Q edges matter.
            scale = 1.0 if name.endswith(("W_Q", "W_K")) else 0.3
            param.copy_(t.randn(param.shape, generator=gen) * scale + (param.dim() == 1) * 0.1)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@pytest.fixture
def tl_model_factory() -> Callable:
    return make_tl_model
