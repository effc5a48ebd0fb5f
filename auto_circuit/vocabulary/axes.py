"""The axis names of the package's shape annotations, defined once for every module.

Shapes are annotated with jaxtyping (``Float[Tensor, "batch seq d_model"]``); within one
call an axis name binds one size across the arguments and the result, which the test suite
checks at run time (``tests/shape_checks.py``). A leading ``*`` marks any number of axes,
``...`` anything. Every name used in an
annotation is listed here (``tests/test_annotations.py`` checks it):

Prompts and positions

- ``batch``: prompts (or prompt pairs) in a batch.
- ``seq``: token (or input) positions; ``*seq`` any leading axes of positions.
- ``prompt``: every prompt of a dataloader, in loader order.
- ``prefix``: positions of a shared prompt prefix (a KV-cache prompt).
- ``n_inputs``: inputs of a compiled tracr model, one per row.
- ``rows``: ``K`` stacked copies of a batch, one per candidate edge set (ACDC).
- ``batch_or_1``, ``seq_or_1``: a ``batch`` or ``seq`` axis that may be 1 (broadcast).

Model widths

- ``d_model``: the residual stream width.
- ``d_head``: one attention head's width.
- ``d``: either width, where a helper serves both.
- ``d_input``: features of one input position, for models fed float vectors (the
  MicroModel takes ``[seq, 2]`` inputs).
- ``vocab``: output logits; ``d_vocab_out``: a tracr model's output vocabulary.
- ``answer``: answers (or wrong answers) of one prompt.

The graph

- ``head``: heads of a destination module (or a block's Q/K/V heads and the destinations
  that ride with them in one product).
- ``src``: the sources feeding one destination module.
- ``n_src``: all sources of the model (the table of source outputs); ``n`` the sources of
  one product in the native kernels.
"""

AXES: frozenset[str] = frozenset(
    {
        "batch",
        "seq",
        "prompt",
        "prefix",
        "n_inputs",
        "rows",
        "batch_or_1",
        "seq_or_1",
        "d_model",
        "d_head",
        "d",
        "d_input",
        "vocab",
        "d_vocab_out",
        "answer",
        "head",
        "src",
        "n_src",
        "n",
    }
)
"""Every axis name above, for tests and tools."""
